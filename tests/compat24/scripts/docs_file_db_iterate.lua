-- dialect: 2.4
-- The second "Simple Username Password Database" example of Dovecot's 2.4
-- documentation (databases/lua.md), with its typo kept: the userdb table
-- { uid = "vmail, gid = "vmail" } is a syntax error, so the script never loads.

local database = "users.txt"

function db_lookup(username)
  for line in io.lines(database) do
    for user, pass in string.gmatch(line, "(%w+)%s(.+)") do
      if (user == username) then
        return {result=0, password=pass}
      end
    end
  end
  return {result=-1}
end

function auth_passdb_lookup(req)
  res = db_lookup(req.username)
  if res.result == 0 then
    return dovecot.auth.PASSDB_RESULT_OK, { password = res.password }
  end
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN
end

function auth_userdb_lookup(req)
  res = db_lookup(req.username)
  if res.result == 0 then
    return dovecot.auth.USERDB_RESULT_OK, { uid = "vmail, gid = "vmail" }
  end
  return dovecot.auth.USERDB_RESULT_USER_UNKNOWN
end
