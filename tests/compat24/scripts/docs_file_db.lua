-- dialect: 2.4
-- The first "Simple Username Password Database" example of Dovecot's 2.4
-- documentation (databases/lua.md), reading whitespace-separated users from a
-- file. It compares with req.username, a 2.3 name that reads nil in 2.4, so on
-- 2.4 it never finds anyone: the docs' example is kept as it is to show that.

function auth_passdb_lookup(req)
  for line in io.lines("users.txt") do
    for user, pass in string.gmatch(line, "(%w+)%s(.+)") do
      if (user == req.username) then
        return dovecot.auth.PASSDB_RESULT_OK, { password = pass }
      end
    end
  end

  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN
end
