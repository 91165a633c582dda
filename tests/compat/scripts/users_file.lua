-- Shape: the file-backed examples of Dovecot 2.3's Lua auth docs (lua_api.md §8 #12):
-- GLOBAL variables (`users`, `res`), a users file read with io.lines in script_init,
-- passdb string results that Dovecot verifies (plain and hashed passwords), userdb
-- tables with numbers, and auth_userdb_iterate.
-- dialect: 2.3
users = {}

function db_lookup(username)
  local user = users[username]
  if user == nil then
    return {result = -1}
  end
  return {result = 0, password = user.password, uid = user.uid, gid = user.gid, home = user.home,
          extra = user.extra}
end

function script_init()
  for line in io.lines("{{ LUA_DIR }}/users.txt") do
    if line ~= "" and line:sub(1, 1) ~= "#" then
      local name, password, uid, gid, home, extra = line:match("^([^:]*):([^:]*):(%d*):(%d*):([^:]*):?(.*)$")
      users[name] = {password = password, uid = tonumber(uid), gid = tonumber(gid), home = home,
                     extra = extra}
    end
  end
  return 0
end

function auth_passdb_lookup(req)
  res = db_lookup(req.user)
  if res.result == 0 then
    local fields = "password=" .. res.password
    if res.extra ~= "" then
      fields = fields .. " " .. res.extra
    end
    return dovecot.auth.PASSDB_RESULT_OK, fields
  end
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
end

function auth_userdb_lookup(req)
  res = db_lookup(req.user)
  if res.result == 0 then
    return dovecot.auth.USERDB_RESULT_OK, {uid = res.uid, gid = res.gid, home = res.home}
  end
  return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "no such user"
end

function auth_userdb_iterate()
  local names = {}
  for name in pairs(users) do
    names[#names + 1] = name
  end
  table.sort(names)
  return names
end
