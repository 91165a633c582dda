-- Shape: accounts a script ties to trusted networks with allow_real_nets / allow_nets (a
-- webmail-only account that may log in only from the webmail host, a service account for
-- internal clients), while doveadm auth lookup (a PASS lookup, usually with no IP at all)
-- and LMTP still ask the same script. Dovecot verifies the returned passwords.
-- dialect: 2.3
local auth = dovecot.auth

local accounts = {
  webmail = "password=webpass allow_real_nets=10.0.0.0/8,127.0.0.1",
  tbl = {password = "tblpass", allow_real_nets = "10.0.0.0/8"},
  clients = "password=clientpass allow_nets=192.0.2.0/24",
  localonly = "password=localpass allow_real_nets=local",
  token = "nopassword=y allow_real_nets=10.0.0.0/8",
  anyone = "password=anypass",
}

function auth_passdb_lookup(req)
  local found = accounts[req.user]
  if found == nil then
    return auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return auth.PASSDB_RESULT_OK, found
end

function auth_userdb_lookup(req)
  if accounts[req.user] == nil then
    return auth.USERDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return auth.USERDB_RESULT_OK, "uid=5000 gid=5000 home=/srv/mail/" .. req.user
end
