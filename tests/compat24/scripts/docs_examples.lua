-- dialect: 2.4
-- The "Examples" block of Dovecot's 2.4 documentation (databases/lua.md): one
-- test user in passdb, userdb and iteration. The docs' uid/gid "vmail" is
-- "nobody"/"nogroup" here, names that exist on a plain Debian system.

function auth_passdb_lookup(req)
  if req.user == "testuser1" then
    return dovecot.auth.PASSDB_RESULT_OK, { password = "pass" }
  end
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
end

function auth_userdb_lookup(req)
  if req.user == "testuser1" then
    return dovecot.auth.USERDB_RESULT_OK, { uid = "nobody", gid = "nogroup" }
  end
  return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such user"
end

function script_init()
  return 0
end

function script_deinit()
end

function auth_userdb_iterate()
  return {"testuser1"}
end
