-- Shape: the result-value corner cases of lua_api.md §9 (items 1-8) seen through
-- auth_passdb_lookup (no auth_password_verify, so Dovecot verifies the returned password)
-- and auth_userdb_lookup: renames, missing passwords, nil second values, numeric-string
-- codes, integer and empty keys, number rendering, failure codes, NEXT and noauthenticate,
-- and uid/gid values (names, the 31-bit limit).
-- dialect: 2.3
local auth = dovecot.auth
local OK = auth.PASSDB_RESULT_OK

local passdb = {
  ["tbl@lookup"] = {OK, {password = "secret", user = "renamed@lookup"}},
  plain = {OK, "password=secret"},
  crypt = {OK, "password={SHA512-CRYPT}$6$c0tvQGdhRNadaffg$tEz2hwDlO0YiF5Qys0IvL9P3k0ok0gWNBP.18HlpiSf3Dg0.xapQJLcg3/p3GiGHSUC7ABtHb7z.DURIjGkr6."},
  empty = {OK, "password="},
  nopass = {OK, "quota=1"},
  anypass = {OK, {nopassword = "y"}},
  strcode = {"1", "password=secret"},
  numdata = {OK, 42},
  intkey = {OK, {"password=secret"}},
  emptykey = {OK, {[""] = "x", password = "secret"}},
  emptytok = {OK, "password=secret =x"},
  numbers = {OK, {password = "secret", half = 1.5, three = 3.0, huge = 1e20, neg = -5, big = 2^53,
                  yes = true, no = false}},
  disabled = {auth.PASSDB_RESULT_USER_DISABLED, "disabled by lua"},
  expired = {auth.PASSDB_RESULT_PASS_EXPIRED, "expired by lua"},
  internal = {auth.PASSDB_RESULT_INTERNAL_FAILURE, "backend down"},
  internal_empty = {auth.PASSDB_RESULT_INTERNAL_FAILURE, ""},
  unknown = {auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"},
  nextstr = {auth.PASSDB_RESULT_NEXT, "password=secret extra=a=b flag"},
  nexttbl = {auth.PASSDB_RESULT_NEXT, {password = "secret", extra = "x"}},
  noauth = {OK, {password = "secret", noauthenticate = "y"}},
  failtbl = {auth.PASSDB_RESULT_USER_DISABLED, {reason = "ignored"}},
  badval = {OK, {password = "secret", fn = print}},
  escaped = {OK, {password = "secret", reason = "two words\tand a tab"}},
  spaced = {OK, "password=secret   extra1=a=b  flag"},
  scheme = {OK, {password = "{NOSUCH}secret"}},
}

function auth_passdb_lookup(req)
  if req.user == "nonil" then
    return auth.PASSDB_RESULT_USER_UNKNOWN
  end
  if req.user == "raises" then
    error("lookup raised")
  end
  local entry = passdb[req.user]
  if entry == nil then
    return auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return entry[1], entry[2]
end

local userdb = {
  ["renamed@lookup"] = {auth.USERDB_RESULT_OK, {uid = 7, home = "/home/renamed"}},
  ["uren@lookup"] = {auth.USERDB_RESULT_OK, {user = "other@lookup", uid = 8}},
  plain = {auth.USERDB_RESULT_OK, "uid=1000 gid=1000 home=/home/plain"},
  numbers = {auth.USERDB_RESULT_OK, {uid = 3.0, gid = -5, quota = 1.5}},
  intkey = {auth.USERDB_RESULT_OK, {"uid=1"}},
  failtbl = {auth.USERDB_RESULT_USER_UNKNOWN, {uid = 1}},
  internal = {auth.USERDB_RESULT_INTERNAL_FAILURE, "userdb backend down"},
  internal_empty = {auth.USERDB_RESULT_INTERNAL_FAILURE, ""},
  named = {auth.USERDB_RESULT_OK, {uid = "nobody", gid = "nogroup"}},
  badname = {auth.USERDB_RESULT_OK, {uid = "no-such-user-xyz"}},
  badname_gid = {auth.USERDB_RESULT_OK, {uid = "no-such-user-xyz", gid = 1}},
  maxid = {auth.USERDB_RESULT_OK, "uid=2147483647 gid=0002147483647"},
  bigid = {auth.USERDB_RESULT_OK, {uid = 2147483648, gid = 1}},
}

function auth_userdb_lookup(req)
  if req.user == "nonil" then
    return auth.USERDB_RESULT_USER_UNKNOWN
  end
  local entry = userdb[req.user]
  if entry == nil then
    return auth.USERDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return entry[1], entry[2]
end

function auth_userdb_iterate()
  return {"a", "b", k = "c"}
end
