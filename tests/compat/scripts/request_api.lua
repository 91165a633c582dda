-- Shape: scripts that lean on the request object's methods and views (lua_api.md §4, §5;
-- the docs' password_verify example and nauthilus-style request introspection):
-- req:var_expand templates, req:password_verify against stored hashes (numeric results,
-- error strings), req.passdb / req.userdb field views, dovecot.i_info process logging and
-- req:log_info request logging.
-- dialect: 2.3
local OK = dovecot.auth.PASSDB_RESULT_OK

local hashes = {
  ["alice@example.org"] = "{SSHA256}/ug2AzinBRbeX7BJSybibhyimnW71miGFWPznVwxtyf74bz5",
  ["bob@example.org"] = "{SHA256-CRYPT}$5$ha1FQk4lenESdfHF$f2SOAUPIchL2DY8qZXlFOQw9n1DDoFDUvagkGi2Fu97",
  ["carol@example.net"] = "carolpass",
  ["odd@example.org"] = "{NOSUCH}whatever",
  ["broken@example.org"] = "{SSHA256}!!!",
}

dovecot.i_info("request_api.lua loaded")

function auth_password_verify(req, password)
  local stored = hashes[req:var_expand("%Lu")]
  dovecot.i_info(req:var_expand("verify %u service=%s mech=%m rip=%r lip=%l port=%a secured=%c"))
  if stored == nil then
    req:log_info("no stored hash")
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, ""
  end
  local rc, err = req:password_verify(stored, password)
  req:log_info("password_verify returned " .. tostring(rc) .. " " .. tostring(err))
  if rc == OK then
    return OK, {
      userdb_home = req:var_expand("/srv/mail/%d/%n"),
      userdb_uid = 2000,
      expanded = req:var_expand("%n|%d|%1n|%.2n|%-2.n|%Un|%Rn|%{domain_first}|%{if;%d;eq;example.org;ours;theirs}"),
      user_md5 = req:var_expand("%{md5:user}"),
      odd = req:var_expand("%Z %{nosuchvar}"),
      seen_passdb = tostring(req.passdb.expanded),
    }
  elseif rc < 0 then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, err
  end
  return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, err
end

function auth_passdb_lookup(req)
  local stored = hashes[req.user]
  if stored == nil then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, ""
  end
  return OK, "password=" .. stored .. " lookup=" .. req:var_expand("%{sha1:user}")
end

function auth_userdb_lookup(req)
  local home = req.userdb.home or req:var_expand("/srv/mail/%d/%n")
  req:log_info("userdb home " .. home .. " passdb expanded " .. tostring(req.passdb.expanded))
  local fields = "home=" .. home .. " uid=" .. (req.userdb.uid or "3000") .. " gid=3000"
  if req.passdb.expanded ~= nil then
    fields = fields .. " from_passdb=" .. req.passdb.expanded
  end
  return dovecot.auth.USERDB_RESULT_OK, fields
end
