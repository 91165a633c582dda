-- The trivial benchmark script: every user exists and has the password "benchpass".
-- It measures the server around the script (protocol, Lua call, password check), not the script.

function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_OK, "password=benchpass"
end

function auth_userdb_lookup(req)
  return dovecot.auth.USERDB_RESULT_OK, "uid=65534 gid=65534 home=/srv/bench/" .. req.user
end
