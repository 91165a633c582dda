-- Example script for the container: a Dovecot 2.3 Lua passdb/userdb with a user table.
-- Replace it with your own (mount it over /etc/authd/auth.lua); HTTP backends work the
-- same way through dovecot.http.client. Passwords: alice/alicepass, bob/bobpass.
local users = {
  alice = { password = "{PLAIN}alicepass", quota = "1G" },
  bob = {
    password = "{SHA512-CRYPT}$6$Q2q6UjWv81ca/TBL$ICWYLApTCvZ5VGMqAACxAwCPTVZHRUtEKvmdYf8SA7z2gMOfakHOmxkxodaa1ONpE6qYNILzpqgpwhQQ0a9ac.",
    quota = "2G",
  },
}

function auth_passdb_lookup(req)
  local user = users[req.user]
  if user == nil then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return dovecot.auth.PASSDB_RESULT_OK, { password = user.password }
end

-- No uid, gid or home: the Dovecot container's mail_uid and mail_home apply.
function auth_userdb_lookup(req)
  local user = users[req.user]
  if user == nil then
    return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return dovecot.auth.USERDB_RESULT_OK, { quota_rule = "*:storage=" .. user.quota }
end

function auth_userdb_iterate()
  return { "alice", "bob" }
end
