-- authd.dict(name) (lua_api/dict.py): configured dicts with the object API of Dovecot's
-- lib-dict Lua binding (dict-lua.c, dict-iter-lua.c, dict-txn-lua.c): the same method
-- names, argument counts, return shapes and error texts, plus txn:atomic_inc(). Each
-- lookup, iteration and commit yields to authd's event loop (or blocks where Lua
-- cannot yield). Loaded once per state, after the prelude.
local yield_io, io_kind, names = ...

local type, select, error, setmetatable, tonumber, tostring, rawget =
  type, select, error, setmetatable, tonumber, tostring, rawget
local format, sub = string.format, string.sub
local floor = math.floor
local tointeger = math.tointeger or function(n)  -- Lua 5.1 and 5.2
  if n == floor(n) and n > -2^53 and n < 2^53 then return n end
end

-- lib-lua's DLUA_REQUIRE_ARGS(_IN): luaL_error, so the caller's position comes first.
local function require_args(n, low, high)
  if high == nil then
    if n ~= low then error(format("expected %d arguments, got %d", low, n), 3) end
  elseif n < low or n > high then
    error(format("expected %d to %d arguments, got %d", low, high, n), 3)
  end
end

-- luaL_checkstring / luaL_checkinteger on method arguments (#1 is the first after self).
local function check_string(value, arg, fname)
  local kind = type(value)
  if kind == "number" then return tostring(value) end
  if kind ~= "string" then
    error(format("bad argument #%d to '%s' (string expected, got %s)", arg, fname, kind), 3)
  end
  return value
end

local function check_integer(value, arg, fname)
  local n = tonumber(value)
  if n == nil or (type(value) ~= "number" and type(value) ~= "string") then
    error(format("bad argument #%d to '%s' (number expected, got %s)", arg, fname, type(value)), 3)
  end
  local i = tointeger(n)
  if i == nil then
    error(format("bad argument #%d to '%s' (number has no integer representation)", arg, fname), 3)
  end
  return i
end

-- lua_dict_check_key_prefix()
local function check_prefix(key, username)
  if sub(key, 1, 7) == "shared/" then return end
  if sub(key, 1, 5) == "priv/" then
    if username == nil or username == "" then
      error("priv/ dict key prefix requires username", 3)
    end
    return
  end
  error("Invalid dict key prefix", 3)
end

local dict_of = setmetatable({}, {__mode = "k"})  -- dict object -> its name
local txn_of = setmetatable({}, {__mode = "k"})   -- transaction object -> its state

local function check_self(self, kinds, what, fname)
  local data = kinds[self]
  if data == nil then
    error(format("bad argument #1 to '%s' (%s expected, got %s)", fname, what, type(self)), 3)
  end
  return data
end

local function io(payload)
  local result = yield_io(io_kind, payload)
  if result.error then error(result.error, 0) end  -- lua_error(): the driver's text as it is
  return result
end

local dict_methods, txn_methods = {}, {}
local dict_meta = {__name = "struct dict", __index = dict_methods}
local txn_meta = {__name = "struct dict_transaction_context", __index = txn_methods}
local iter_meta = {__name = "struct lua_dict_iter"}

function dict_methods.lookup(...)
  local n = select("#", ...)
  require_args(n, 2, 3)
  local self, key, username = ...
  local name = check_self(self, dict_of, "dovecot_dict", "lookup")
  key = check_string(key, 1, "lookup")
  if n >= 3 then username = check_string(username, 2, "lookup") end
  check_prefix(key, username)
  local result = io({op = "lookup", dict = name, key = key, username = username})
  return result.values
end

function dict_methods.iterate(...)
  local n = select("#", ...)
  require_args(n, 3, 4)
  local self, path, flags, username = ...
  local name = check_self(self, dict_of, "dovecot_dict", "iterate")
  path = check_string(path, 1, "iterate")
  flags = check_integer(flags, 2, "iterate")
  if n >= 4 then username = check_string(username, 3, "iterate") end
  check_prefix(path, username)
  local iter = setmetatable({}, iter_meta)
  local rows, pos, failure = nil, 1, nil
  -- The step function: every row is fetched before the first pair is returned, as
  -- Dovecot buffers them; an error is raised after the buffered pairs.
  local function step(...)
    require_args(select("#", ...), 2)
    if rows == nil then
      local result = yield_io(io_kind, {op = "iterate", dict = name, path = path, flags = flags,
        username = username})
      rows, failure = result.rows or {}, result.error
    end
    local row = rows[pos]
    if row == nil then
      if failure then
        local text = failure
        failure = nil
        error(text, 0)
      end
      return
    end
    rows[pos] = nil
    pos = pos + 1
    return row[1], row[2]
  end
  return step, iter
end

function dict_methods.transaction_begin(...)
  local n = select("#", ...)
  require_args(n, 1, 3)
  local self, username, expire_secs = ...
  local name = check_self(self, dict_of, "dovecot_dict", "transaction_begin")
  if n >= 2 then username = check_string(username, 1, "transaction_begin") end
  if n >= 3 then expire_secs = check_integer(expire_secs, 2, "transaction_begin") end
  local txn = setmetatable({}, txn_meta)
  txn_of[txn] = {dict = name, username = username, expire_secs = expire_secs or 0, state = "open",
    changes = {}}
  return txn
end

-- sanity_check_txn(); Dovecot checks only commit and rollback, authd every change too.
local function open_txn(self, fname)
  local txn = check_self(self, txn_of, "dovecot_dict_txn", fname)
  if txn.state == "committed" then error("dict transaction already committed", 3) end
  if txn.state == "aborted" then error("dict transaction already aborted", 3) end
  return txn
end

local function add(txn, change)
  local changes = txn.changes
  changes[#changes + 1] = change
end

function txn_methods.set(...)
  require_args(select("#", ...), 3)
  local self, key, value = ...
  local txn = open_txn(self, "set")
  key = check_string(key, 1, "set")
  value = check_string(value, 2, "set")
  check_prefix(key, txn.username)
  add(txn, {op = "set", key = key, value = value})
end

function txn_methods.unset(...)
  require_args(select("#", ...), 2)
  local self, key = ...
  local txn = open_txn(self, "unset")
  key = check_string(key, 1, "unset")
  check_prefix(key, txn.username)
  add(txn, {op = "unset", key = key})
end

-- authd's extension (Dovecot does not expose dict_atomic_inc()): add diff to the
-- key's integer value (a missing key counts from 0); expire_secs, if given, replaces
-- the transaction's for this key.
function txn_methods.atomic_inc(...)
  local n = select("#", ...)
  require_args(n, 3, 4)
  local self, key, diff, expire_secs = ...
  local txn = open_txn(self, "atomic_inc")
  key = check_string(key, 1, "atomic_inc")
  diff = check_integer(diff, 2, "atomic_inc")
  if n >= 4 then expire_secs = check_integer(expire_secs, 3, "atomic_inc") end
  check_prefix(key, txn.username)
  add(txn, {op = "inc", key = key, diff = diff, expire_secs = expire_secs})
end

function txn_methods.set_timestamp(...)
  require_args(select("#", ...), 2)
  local self, ts = ...
  local txn = open_txn(self, "set_timestamp")
  local function number(field)
    local value = type(ts) == "table" and rawget(ts, field) or nil
    return type(value) == "number" and value or nil
  end
  -- dlua_table_get_number_by_str(); the timestamp only matters to Cassandra, so it is kept unused
  if number("tv_sec") == nil then error("tv_sec missing from table", 2) end
  if number("tv_nsec") == nil then error("tv_nsec missing from table", 2) end
  txn.timestamp = {number("tv_sec"), number("tv_nsec")}
end

function txn_methods.set_non_atomic(...)
  require_args(select("#", ...), 1)
  open_txn((...), "set_non_atomic")
end

function txn_methods.commit(...)
  require_args(select("#", ...), 1)
  local txn = open_txn((...), "commit")
  txn.state = "committed"
  local result = yield_io(io_kind, {op = "commit", dict = txn.dict, username = txn.username,
    expire_secs = txn.expire_secs, changes = txn.changes})
  txn.changes = {}
  if result.error then error("dict transaction commit failed: " .. result.error, 0) end
end

function txn_methods.rollback(...)
  require_args(select("#", ...), 1)
  local txn = open_txn((...), "rollback")
  txn.state = "aborted"
  txn.changes = {}
end

-- dovecot.dict: the iterate flags, as floats (lua_pushnumber), as Dovecot registers them.
dovecot.dict = {
  ITERATE_FLAG_RECURSE = 1.0,
  ITERATE_FLAG_SORT_BY_KEY = 2.0,
  ITERATE_FLAG_SORT_BY_VALUE = 4.0,
  ITERATE_FLAG_NO_VALUE = 8.0,
  ITERATE_FLAG_EXACT_KEY = 16.0,
  ITERATE_FLAG_ASYNC = 32.0,
}

-- authd.dict(name): one object per configured dict and state.
local objects = {}
for i = 1, #names do
  local object = setmetatable({}, dict_meta)
  dict_of[object] = names[i]
  objects[names[i]] = object
end

local authd = rawget(_G, "authd") or {}
function authd.dict(...)
  local name = ...
  if type(name) ~= "string" then
    local kind = select("#", ...) == 0 and "no value" or type(name)
    error(format("bad argument #1 to 'dict' (string expected, got %s)", kind), 2)
  end
  local object = objects[name]
  if object == nil then error(format("authd.dict: no dict named '%s' is configured", name), 2) end
  return object
end
_G.authd = authd
