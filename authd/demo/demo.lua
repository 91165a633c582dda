-- authd demo script: a tiny user table served the way a Dovecot 2.3 Lua
-- passdb/userdb does it. Passwords: alice/alicepass, bob/bobpass, carol/carolpass.
local users = {
  alice = { password = "{PLAIN}alicepass", quota = "1G" },
  bob = {
    password = "{SHA512-CRYPT}$6$Q2q6UjWv81ca/TBL$ICWYLApTCvZ5VGMqAACxAwCPTVZHRUtEKvmdYf8SA7z2gMOfakHOmxkxodaa1ONpE6qYNILzpqgpwhQQ0a9ac.",
    quota = "2G",
  },
  carol = { password = "{PLAIN}carolpass", nologin = "y", reason = "Account moved to the new server" },
}

function script_init()
  dovecot.i_info("demo script loaded with 3 users")
  return 0
end

function auth_passdb_lookup(req)
  local user = users[req.user]
  if user == nil then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
  end
  local fields = { password = user.password, userdb_quota_rule = "*:storage=" .. user.quota }
  if user.nologin then
    fields.nologin = user.nologin
    fields.reason = user.reason
  end
  return dovecot.auth.PASSDB_RESULT_OK, fields
end

function auth_userdb_lookup(req)
  local user = users[req.user]
  if user == nil then
    return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return dovecot.auth.USERDB_RESULT_OK, {
    uid = "65534", gid = "65534", home = "/var/empty/" .. req.user,
    quota_rule = "*:storage=" .. user.quota,
  }
end

function auth_userdb_iterate()
  local names = {}
  for name in pairs(users) do names[#names + 1] = name end
  table.sort(names)
  return names
end
