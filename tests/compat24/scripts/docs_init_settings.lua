-- dialect: 2.4
-- The "Initialization" example of Dovecot's 2.4 documentation
-- (docs/core/config/auth/databases/lua.md): script_init(args) receives the
-- lua_settings, the passdb answers every user with that password, and
-- auth_passdb_get_cache_key() names the cache key. Written for authd's tests.

local password = nil

function script_init(args)
  password = args["password"]
  return 0
end

function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_OK, { ["password"] = password }
end

function auth_passdb_get_cache_key()
  return "%{user | username}\t%{protocol}"
end
