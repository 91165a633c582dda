-- The Dovecot side of the world as an auth script sees it (Dovecot 2.3 lib-lua),
-- plus the few hooks authd needs to drive entry points. Runs once per Lua state,
-- before the script's main chunk. `host` holds the Python callables.
local host = ...

local type, select, tostring, tonumber, error, pcall, xpcall, rawget, setmetatable =
  type, select, tostring, tonumber, error, pcall, xpcall, rawget, setmetatable
local traceback = debug.traceback
local coroutine = coroutine
local unpack = table.unpack or unpack
local math_tointeger = math.tointeger or function(x)
  if x == math.floor(x) and x >= -2^63 and x < 2^63 then return x end
  return nil
end

python = nil

-- Scripts must not be able to end the daemon.
if os then
  os.exit = function()
    error("os.exit() is not allowed: authd keeps running (use error() to fail the request)", 2)
  end
end

local function check_args(n, expected)
  if n ~= expected then
    error(string.format("expected %d arguments, got %d", expected, n), 3)
  end
end

-- luaL_checkstring: strings and numbers pass (numbers become strings).
local function check_string(value, argn, fname)
  local t = type(value)
  if t == "string" then return value end
  if t == "number" then return tostring(value) end
  error(string.format("bad argument #%d to '%s' (string expected, got %s)",
    argn, fname, t == "nil" and "no value" or t), 3)
end

local function check_integer(value, argn, fname)
  local n = tonumber(value)
  local i = n and math_tointeger(n)
  if i == nil then
    error(string.format("bad argument #%d to '%s' (number has no integer representation)", argn, fname), 3)
  end
  return i
end

---------------------------------------------------------------------------
-- dovecot table: functions live in the metatable, sub-tables are raw fields.
local dovecot_methods = {}
dovecot_methods.__index = dovecot_methods
dovecot = setmetatable({}, dovecot_methods)

for level, name in ipairs({"i_debug", "i_info", "i_warning", "i_error"}) do
  dovecot_methods[name] = function(...)
    check_args(select("#", ...), 1)
    host.log(level - 1, check_string((...), 1, name))
  end
end

-- Bitwise operators are Lua 5.3+ syntax; compile them only where they exist so the
-- prelude also loads on Lua 5.1/LuaJIT (which get the `bit` library instead).
local band, bor, bnot
if bit then
  band, bor, bnot = bit.band, bit.bor, bit.bnot
elseif _VERSION == "Lua 5.1" then
  -- Plain Lua 5.1 has neither operators nor a bit library: arithmetic on 52 bits.
  local function bitwise(a, b, keep)
    local out, place = 0, 1
    for _ = 1, 52 do
      local x, y = a % 2, b % 2
      if keep(x, y) then out = out + place end
      a, b, place = (a - x) / 2, (b - y) / 2, place * 2
    end
    return out
  end
  band = function(a, b) return bitwise(a, b, function(x, y) return x == 1 and y == 1 end) end
  bor = function(a, b) return bitwise(a, b, function(x, y) return x == 1 or y == 1 end) end
  bnot = function(a) return -1 - a end
else
  band, bor, bnot = load("return function(a, b) return a & b end, function(a, b) return a | b end, "
    .. "function(a) return ~a end")()
end

function dovecot_methods.has_flag(...)
  check_args(select("#", ...), 2)
  local value, flag = ...
  value, flag = check_integer(value, 1, "has_flag"), check_integer(flag, 2, "has_flag")
  return band(value, flag) == flag
end

function dovecot_methods.set_flag(...)
  check_args(select("#", ...), 2)
  local value, flag = ...
  return bor(check_integer(value, 1, "set_flag"), check_integer(flag, 2, "set_flag"))
end

function dovecot_methods.clear_flag(...)
  check_args(select("#", ...), 2)
  local value, flag = ...
  return band(check_integer(value, 1, "clear_flag"), bnot(check_integer(flag, 2, "clear_flag")))
end

local strict_globals = {
  __index = function(_, name)
    error("attempt to write to read undeclared global variable " .. tostring(name), 2)
  end,
  __newindex = function(t, name, value)
    if type(value) == "function" then
      rawset(t, name, value)
    else
      error("attempt to write to undeclared global variable " .. tostring(name), 2)
    end
  end,
}

function dovecot_methods.restrict_global_variables(...)
  check_args(select("#", ...), 1)
  if (...) then
    setmetatable(_G, strict_globals)
  else
    setmetatable(_G, {})
  end
end

-- Result codes are pushed with lua_pushnumber in Dovecot: floats (tostring gives "1.0").
local auth_values = {
  PASSDB_RESULT_INTERNAL_FAILURE = -1.0,
  PASSDB_RESULT_SCHEME_NOT_AVAILABLE = -2.0,
  PASSDB_RESULT_USER_UNKNOWN = -3.0,
  PASSDB_RESULT_USER_DISABLED = -4.0,
  PASSDB_RESULT_PASS_EXPIRED = -5.0,
  PASSDB_RESULT_NEXT = -6.0,
  PASSDB_RESULT_PASSWORD_MISMATCH = 0.0,
  PASSDB_RESULT_OK = 1.0,
  USERDB_RESULT_INTERNAL_FAILURE = -1.0,
  USERDB_RESULT_USER_UNKNOWN = -2.0,
  USERDB_RESULT_OK = 1.0,
}
local auth_meta = {}
auth_meta.__index = auth_meta
dovecot.auth = setmetatable(auth_values, auth_meta)

---------------------------------------------------------------------------
-- The request object: a fresh table per call with raw fields item, passdb,
-- userdb and the flags; variables and methods come from its metatable.
local request_vars = setmetatable({}, {__mode = "k"})
local request_methods = {}

local function check_request(req, fname)
  if type(req) ~= "table" then
    error(string.format("Bad argument #1, expected auth_request got %s", type(req)), 3)
  end
  return rawget(req, "item")
end

local request_meta = {
  __index = function(req, key)
    if type(key) ~= "string" then
      key = check_string(key, 2, "__index")
    end
    local vars = request_vars[req]
    if vars then
      local value = vars[key]
      if value ~= nil then return value end
    end
    local method = request_methods[key]
    if method ~= nil then return method end
    return rawget(req, key)
  end,
}

for level, name in ipairs({"log_debug", "log_info", "log_warning", "log_error"}) do
  request_methods[name] = function(req, msg)
    local item = check_request(req, name)
    host.request_log(item, level - 1, check_string(msg, 2, name))
  end
end

function request_methods.password_verify(req, crypted, plain)
  local item = check_request(req, "password_verify")
  local rc, err = host.password_verify(item,
    type(crypted) == "number" and tostring(crypted) or crypted,
    type(plain) == "number" and tostring(plain) or plain)
  return rc + 0.0, err
end

function request_methods.var_expand(req, template)
  local item = check_request(req, "var_expand")
  local ok, value = host.var_expand(item, check_string(template, 2, "var_expand"))
  if not ok then error(value, 2) end
  return value
end

function request_methods.response_from_template(req, template)
  local item = check_request(req, "response_from_template")
  local ok, pairs_or_error = host.response_from_template(item, check_string(template, 2, "response_from_template"))
  if not ok then error(pairs_or_error, 2) end
  local result = {}
  for i = 1, #pairs_or_error, 2 do
    local value = pairs_or_error[i + 1]
    if value ~= false then result[pairs_or_error[i]] = value end
  end
  return result
end

local function field_view(item, fields)
  return setmetatable({item = item}, {
    __index = function(_, key)
      return fields[check_string(key, 2, "__index")]
    end,
  })
end

-- Called by authd for every entry point call.
local function new_request(item, vars, passdb_fields, userdb_fields, flags)
  local req = {
    item = item,
    passdb = field_view(item, passdb_fields),
    userdb = field_view(item, userdb_fields),
    skip_password_check = flags.skip_password_check == true,
    passdbs_seen_user_unknown = flags.passdbs_seen_user_unknown == true,
    passdbs_seen_internal_failure = flags.passdbs_seen_internal_failure == true,
    userdbs_seen_internal_failure = flags.userdbs_seen_internal_failure == true,
  }
  request_vars[req] = vars
  return setmetatable(req, request_meta)
end

---------------------------------------------------------------------------
-- I/O from scripts (HTTP, DNS): yield to authd's event loop when the call runs
-- as authd's coroutine and may yield here; otherwise block this thread.
local drivers = setmetatable({}, {__mode = "k"})
local isyieldable = coroutine.isyieldable

local function yield_io(kind, payload)
  local running = coroutine.running()
  if isyieldable and drivers[running] and isyieldable() then
    return coroutine.yield("io", kind, payload)
  end
  return host.io_blocking(kind, payload)
end

-- Error objects may be anything; never let __tostring raise in the handler.
local function message_handler(err)
  if type(err) ~= "string" then
    local ok, text = pcall(tostring, err)
    if ok and type(text) == "string" then
      err = text
    else
      err = "(error object is a " .. type(err) .. " value)"
    end
  end
  -- Cut the traceback where authd's own frames begin: admins want their script's.
  local text = traceback(err, 2)
  local cut = text:find("\n\t%[C%]: in function 'xpcall'")
  return cut and text:sub(1, cut - 1) or text
end

---------------------------------------------------------------------------
-- Turning returns into what Dovecot would read from the stack.

-- lua_isnumber + lua_tointeger: numbers and numeric strings; non-integral -> 0.
local function to_code(value)
  local n = tonumber(value)
  if n == nil or (type(value) ~= "number" and type(value) ~= "string") then
    return false, 0
  end
  return true, math_tointeger(n) or 0
end

-- auth_lua_export_table: returns a flat {key, value, ...} list, or nil and the
-- reason Dovecot 2.3.19 would crash on this table.
local function export_table(t)
  local out, warnings = {}, {}
  for key, value in next, t do
    if type(key) ~= "string" then
      local shown = type(key) == "number" and (" (" .. tostring(key) .. ")") or ""
      return nil, "result table has a " .. type(key) .. " key" .. shown, warnings
    end
    local vt = type(value)
    if vt == "number" then
      value = math_tointeger(value) or 0
    elseif vt == "boolean" then
      value = value and "yes" or "no"
    elseif vt ~= "string" then
      warnings[#warnings + 1] = "'" .. key .. "' has invalid value type " .. vt .. " - ignoring"
      value = ""
    end
    out[#out + 1] = key
    out[#out + 1] = value
  end
  return out, nil, warnings
end

-- Describe the (code, data) pair an entry point returned.
local function describe_result(code, data)
  local is_number, code_int = to_code(code)
  local dtype = type(data)
  if dtype == "table" then
    local fields, crash, warnings = export_table(data)
    return is_number, code_int, type(code), dtype, fields, crash, warnings
  end
  if dtype == "number" then
    return is_number, code_int, type(code), "string", tostring(data)
  end
  return is_number, code_int, type(code), dtype, dtype == "string" and data or nil
end

local function describe_list(t)
  if type(t) ~= "table" then return nil, "not a table" end
  local out = {}
  for _, value in next, t do
    local vt = type(value)
    if vt ~= "string" and vt ~= "number" then return nil, "not a string" end
    out[#out + 1] = tostring(value)
  end
  return out
end

---------------------------------------------------------------------------
-- Driving entry points.

local function pack(...)
  return select("#", ...), {...}
end

local describers = {
  lookup = function(results) return describe_result(results[2], results[3]) end,
  list = function(results) return describe_list(results[2]) end,
  init = function(results)
    local value = results[2]
    if type(value) ~= "number" then return type(value), nil end
    if math.type then return math.type(value), value end
    return value == math.floor(value) and "integer" or "float", value  -- Lua 5.1
  end,
  none = function() end,
}

-- Run `target` (a global's name, fetched at call time like Dovecot's dlua_pcall,
-- or a function) with a traceback handler, then describe what it returned in
-- plain values. Returns "done", ok, description... or "done", false, error.
local function call_entry(target, mode, ...)
  local fn = target
  if type(target) == "string" then
    local found
    found, fn = pcall(function() return _G[target] end)
    if not found or type(fn) ~= "function" then
      return "done", false, "'" .. target .. "' is not a function", "missing"
    end
  end
  local _, results = pack(xpcall(fn, message_handler, ...))
  if not results[1] then
    return "done", false, results[2]
  end
  return "done", true, describers[mode](results)
end

-- Calls in progress by handle: lupa cannot hand Lua threads to Python and back.
local calls = {}
local last_handle = 0

-- A coroutine for one call; authd resumes it after each I/O it yields for.
local function start_call(target, mode, ...)
  local args = {...}
  local nargs = select("#", ...)
  local co = coroutine.create(function()
    return call_entry(target, mode, unpack(args, 1, nargs))
  end)
  drivers[co] = true
  last_handle = last_handle + 1
  calls[last_handle] = co
  return last_handle
end

local function resume(handle, ...)
  local co = calls[handle]
  local n, result = pack(coroutine.resume(co, ...))
  if not result[1] then
    -- Only authd's own wrapper can fail here (e.g. out of memory).
    calls[handle] = nil
    return "done", false, message_handler(result[2])
  end
  if coroutine.status(co) == "dead" then calls[handle] = nil end
  return unpack(result, 2, n)
end

-- Forget a call that will not be resumed (its request was cancelled).
local function abandon(handle)
  calls[handle] = nil
end

-- Does the global exist as a function? (rawget, as Dovecot's has_function)
local function has_function(name)
  return type(rawget(_G, name)) == "function"
end

return {
  new_request = new_request,
  has_function = has_function,
  start_call = start_call,
  resume = resume,
  abandon = abandon,
  describe_result = describe_result,
  describe_list = describe_list,
  yield_io = yield_io,
  check_string = check_string,
  check_args = check_args,
  methods = dovecot_methods,
}
