-- Shape: the result-value corner cases of lua_api.md §9 seen through
-- auth_password_verify (items 1, 3, 4, 5, 7, 8): a table rename, a nil second value,
-- numeric-string codes and data, integer keys, fields with failure codes, NEXT; with no
-- auth_passdb_lookup (credential lookups fail) and no userdb functions.
-- dialect: 2.3
local auth = dovecot.auth
local OK = auth.PASSDB_RESULT_OK

local results = {
  vren = {OK, {user = "renamed@verify"}},
  vstr = {"1", "via=verify"},
  vnum = {OK, 42},
  vintkey = {OK, {"via=verify"}},
  vmis = {auth.PASSDB_RESULT_PASSWORD_MISMATCH, "bad password text"},
  vfailtbl = {auth.PASSDB_RESULT_USER_DISABLED, {reason = "ignored"}},
  vnextstr = {auth.PASSDB_RESULT_NEXT, "via=next"},
  vfields = {OK, "via=verify nologin reason=Go_away"},
  vpass = {OK, {password = "echo", userdb_uid = 10}},
  vinternal_empty = {auth.PASSDB_RESULT_INTERNAL_FAILURE, ""},
}

function auth_password_verify(req, password)
  if req.user == "vnil" then
    return auth.PASSDB_RESULT_USER_UNKNOWN
  end
  if password ~= "secret" then
    return auth.PASSDB_RESULT_PASSWORD_MISMATCH, "wrong password"
  end
  local entry = results[req.user]
  if entry == nil then
    return auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return entry[1], entry[2]
end
