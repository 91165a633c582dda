-- The Dovecot side of the world as an auth script sees it (Dovecot 2.3.19 lib-lua,
-- or 2.4.1+ when the script's dialect is "2.4"), plus the few hooks authd needs to
-- drive entry points. Runs once per Lua state, before the script's main chunk.
-- `host` holds the Python callables (lua_api/runtime.py, lua_api/library.py).
local host = ...

local type, select, tostring, tonumber, error, pcall, xpcall, rawget, rawset, setmetatable =
  type, select, tostring, tonumber, error, pcall, xpcall, rawget, rawset, setmetatable
local traceback, getinfo = debug.traceback, debug.getinfo
local format, find, sub, gsub = string.format, string.find, string.sub, string.gsub
local concat = table.concat
local coroutine = coroutine
local unpack = table.unpack or unpack
local math_tointeger = math.tointeger or function(x)
  if x == math.floor(x) and x >= -2^63 and x < 2^63 then return x end
  return nil
end

-- "2.3" or "2.4": which Dovecot's Lua API this state offers.
local v24 = host.dialect == "2.4"

python = nil

-- Scripts must not be able to end the daemon.
if os then
  os.exit = function()
    error("os.exit() is not allowed: authd keeps running (use error() to fail the request)", 2)
  end
end

-- Calls driven by authd (coroutines it may resume elsewhere), by coroutine.
local drivers = setmetatable({}, {__mode = "k"})
local isyieldable = coroutine.isyieldable

---------------------------------------------------------------------------
-- Scripts of a blocking = true db start out running in authd's event loop; what may
-- block the calling thread (a C module's functions, io.popen, os.execute, io.read,
-- req:password_verify) first moves the call to a worker thread, and the script with
-- it from then on (lua_api.runtime.AdaptiveExecutor). `on_loop` is set by authd.
local on_loop = false
local blocking_seen = nil  -- the first such function called, for authd to read after loading

local function may_block(what)
  if blocking_seen == nil then blocking_seen = what end
  if not on_loop then return end
  local running = coroutine.running()
  if isyieldable and drivers[running] and isyieldable() then
    coroutine.yield("io", "thread", what)  -- authd resumes this call in a worker thread
  else
    host.run_in_threads(what)  -- cannot move now (a C boundary): later calls will
  end
end

local function set_on_loop(flag)
  on_loop = flag
end

local function get_blocking_seen()
  return blocking_seen
end

-- A watched C function runs under pcall in its wrapper, so that its errors read as
-- Lua reports them without a wrapper: at the script's line, naming the function as
-- the script called it (a method call does not count self, as luaL_argerror), not
-- at the wrapper's line naming 'f'. Positions already given (an error of a Lua
-- callback) and authd's own errors (call_timeout) go on as they are.
local pack = table.pack or function(...) return {n = select("#", ...), ...} end

local function wrapper_error(message)
  if type(message) ~= "string" or find(message, "^authd: ") or find(message, "^[^\n]-:%d+: ") then
    error(message, 0)
  end
  local info = getinfo(2, "n")  -- the wrapper, as the script called it
  local caller = getinfo(3, "Sl")  -- the script
  local where = (caller and caller.currentline > 0) and format("%s:%d: ", caller.short_src, caller.currentline) or ""
  local name = info and info.name or "?"
  local argn, rest = message:match("^bad argument #(%d+) to '[^']*' (.*)$")
  if argn then
    argn = tonumber(argn)
    if info and info.namewhat == "method" then
      argn = argn - 1
      if argn == 0 then error(where .. format("calling '%s' on bad self %s", name, rest), 0) end
    end
    message = format("bad argument #%d to '%s' %s", argn, name, rest)
  end
  error(where .. message, 0)
end

local function watch_function(lib, name, what)
  local f = lib and rawget(lib, name)
  if type(f) == "function" then
    lib[name] = function(...)
      may_block(what)
      local results = pack(pcall(f, ...))
      if not results[1] then wrapper_error(results[2]) end
      return unpack(results, 2, results.n)
    end
  end
end
watch_function(io, "read", "io.read")

-- C modules that only compute: their functions stay in the event loop.
local NON_BLOCKING_C_MODULES = {
  ["cjson"] = true, ["cjson.safe"] = true, ["lpeg"] = true, ["mime.core"] = true,
  ["struct"] = true, ["bit32"] = true, ["lua-utf8"] = true, ["lfs"] = true,
}

-- Every function of a C module's table (and of its sub-tables) calls may_block first.
local function watch_module(name, module)
  if type(module) ~= "table" or NON_BLOCKING_C_MODULES[name] then return module end
  local seen = {[_G] = true, [package] = true, [package.loaded] = true}
  local function watch(t, prefix, depth)
    if seen[t] then return end
    seen[t] = true
    for key, value in pairs(t) do
      if type(value) == "function" then
        watch_function(t, key, prefix .. tostring(key))
      elseif type(value) == "table" and depth < 2 then
        watch(value, prefix .. tostring(key) .. ".", depth + 1)
      end
    end
  end
  watch(module, name .. ".", 1)
  return module
end

do
  local searchers = package.searchers or package.loaders
  for i = 3, 4 do  -- the C library searchers
    local search = searchers[i]
    if type(search) == "function" then
      searchers[i] = function(name, ...)
        local loader, extra = search(name, ...)
        if type(loader) ~= "function" then return loader, extra end
        return function(...)
          local module = loader(...)
          if module == nil then module = package.loaded[name] end
          return watch_module(name, module)
        end, extra
      end
    end
  end
end

-- DLUA_REQUIRE_ARGS: Dovecot's own errors (its luaL_error) carry no position.
local function check_args(n, expected)
  if n ~= expected then
    error(format("expected %d arguments, got %d", expected, n), 0)
  end
end

local function check_args_in(n, min, max)
  if n < min or n > max then
    error(format("expected %d to %d arguments, got %d", min, max, n), 0)
  end
end

-- luaL_argerror for the API function that called the checker that called this
-- (level 3), reported at the line that called the API function (level 4). Like
-- Lua, a method call does not count self, and a function called without a name
-- (from pcall, or as a tail call) is '?'.
local function arg_error(argn, message)
  local info = getinfo(3, "n")
  local name = info and info.name or "?"
  if info and info.namewhat == "method" then
    argn = argn - 1
    if argn == 0 then
      error(format("calling '%s' on bad self (%s)", name, message), 4)
    end
  end
  error(format("bad argument #%d to '%s' (%s)", argn, name, message), 4)
end

-- luaL_typename as luaL_typeerror shows it: the metatable's __name if it has one.
local function type_name(value)
  local mt = debug.getmetatable(value)
  local name = mt and rawget(mt, "__name")
  if type(name) == "string" then return name end
  return type(value)
end

-- luaL_checkstring: strings and numbers pass (numbers become strings). `value` nil
-- reads as a missing argument unless `present` says it was passed.
local function check_string(value, argn, present)
  local t = type(value)
  if t == "string" then return value end
  if t == "number" then return tostring(value) end
  local shown = (t == "nil" and not present) and "no value" or type_name(value)
  arg_error(argn, "string expected, got " .. shown)
end

-- luaL_checkinteger: integral numbers and strings that convert to them (callers
-- have checked the argument count, so nil was passed).
local function check_integer(value, argn)
  local n = tonumber(value)
  if n == nil or (type(value) ~= "number" and type(value) ~= "string") then
    arg_error(argn, "number expected, got " .. type_name(value))
  end
  local i = math_tointeger(n)
  if i == nil then arg_error(argn, "number has no integer representation") end
  return i
end

---------------------------------------------------------------------------
-- What scripts print. Dovecot's auth processes have /dev/null as stdout, so print,
-- io.write and io.stdout:write go nowhere; io.stderr:write, which would put raw
-- bytes among authd's log lines, is treated alike. With [lua] log_script_output
-- authd logs each line at debug with the script's name (host.script_output).
-- Other files, and io.write after io.output(file), write as before.
if io and io.stdout then
  local stdout, stderr = io.stdout, io.stderr
  local output = host.log_output and host.script_output or nil
  local io_output, io_write = io.output, io.write
  local file_mt = debug.getmetatable(stdout)
  local file_methods = file_mt and rawget(file_mt, "__index")
  local math_type = math.type

  -- lua_writestring's view of a value for io.write; nil if it is not one.
  local function written(value)
    local t = type(value)
    if t == "string" then return value end
    if t ~= "number" then return nil end
    if math_type and math_type(value) == "integer" then return format("%d", value) end
    return format("%.14g", value)
  end

  -- The values' text, or a "bad argument" error at the script's line (level 3).
  local function texts(first, ...)
    local n = select("#", ...)
    if output == nil then
      for i = 1, n do
        local value = (select(i, ...))
        if type(value) ~= "string" and type(value) ~= "number" then
          error(format("bad argument #%d to 'write' (string expected, got %s)", i + first - 1, type_name(value)), 3)
        end
      end
      return nil
    end
    local parts = {}
    for i = 1, n do
      local text = written((select(i, ...)))
      if text == nil then
        error(format("bad argument #%d to 'write' (string expected, got %s)", i + first - 1,
          type_name((select(i, ...)))), 3)
      end
      parts[i] = text
    end
    return concat(parts)
  end

  io.write = function(...)
    local current = io_output()
    if current ~= stdout and current ~= stderr then return io_write(...) end
    local text = texts(1, ...)
    if text ~= nil then output(current == stdout and "stdout" or "stderr", text) end
    return current
  end

  if type(file_methods) == "table" and type(file_methods.write) == "function" then
    local file_write = file_methods.write
    file_methods.write = function(f, ...)
      if f ~= stdout and f ~= stderr then return file_write(f, ...) end
      local text = texts(1, ...)
      if text ~= nil then output(f == stdout and "stdout" or "stderr", text) end
      return f
    end
  end

  print = function(...)
    local n = select("#", ...)
    local parts = {}
    for i = 1, n do
      local ok, text = pcall(tostring, (select(i, ...)))
      if not ok then  -- tostring's own errors at the script's line, a __tostring's as they are
        if type(text) == "string" and not find(text, "^[^\n]-:%d+: ") then error(text, 2) end
        error(text, 0)
      elseif type(text) ~= "string" then
        error("'tostring' must return a string to 'print'", 2)  -- Lua 5.1's wording
      end
      parts[i] = text
    end
    if output ~= nil then output("stdout", concat(parts, "\t") .. "\n") end
  end
end

-- C strings end at the first NUL.
local function c_string(s)
  local nul = find(s, "\0", 1, true)
  return nul and sub(s, 1, nul - 1) or s
end

-- os.execute runs its command as io.popen does (lua_api/popen.py: /bin/sh with the
-- configured environment), with stdin and stdout /dev/null as in Dovecot's auth
-- processes and its stderr logged line by line; it is killed with what it started
-- once authd has given up on the call. It returns what Debian's Lua returns:
-- system()'s status on 5.1 and LuaJIT, true or nil, "exit" or "signal" and the code
-- on 5.3 and 5.4 (lupa's own, not built for POSIX, would say "exit" and the status).
if os and type(rawget(os, "execute")) == "function" and host.run_command then
  local run_command = host.run_command
  local lua51 = _VERSION == "Lua 5.1"
  local raw_status = lua51 and rawget(table, "pack") == nil  -- LuaJIT with 5.2 compat has it
  os.execute = function(...)
    local command = ...
    if command == nil then  -- luaL_optstring: none or nil asks whether there is a shell
      if raw_status then return 1 end
      return true
    end
    local t = type(command)
    if t ~= "string" and t ~= "number" then  -- as the C function raises it (watch_function adds where)
      error(format("bad argument #1 to 'execute' (string expected, got %s)", lua51 and t or type_name(command)), 0)
    end
    local kind, code = run_command(c_string(tostring(command)))
    if raw_status then return kind == "exit" and code * 256 or code end
    if kind == "exit" and code == 0 then return true, kind, code end
    return nil, kind, code
  end
end
watch_function(os, "execute", "os.execute")

---------------------------------------------------------------------------
-- dovecot table: functions live in the metatable, sub-tables are raw fields.
local dovecot_methods = {}
dovecot_methods.__index = dovecot_methods
dovecot = setmetatable({}, dovecot_methods)

for level, name in ipairs({"i_debug", "i_info", "i_warning", "i_error"}) do
  dovecot_methods[name] = function(...)
    check_args(select("#", ...), 1)
    host.log(level - 1, check_string((...), 1, true))
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
  value, flag = check_integer(value, 1), check_integer(flag, 2)
  return band(value, flag) == flag
end

function dovecot_methods.set_flag(...)
  check_args(select("#", ...), 2)
  local value, flag = ...
  return bor(check_integer(value, 1), check_integer(flag, 2))
end

function dovecot_methods.clear_flag(...)
  check_args(select("#", ...), 2)
  local value, flag = ...
  return band(check_integer(value, 1), bnot(check_integer(flag, 2)))
end

local strict_globals = {
  __index = function(_, name)
    error("attempt to write to read undeclared global variable " .. check_string(name, 2), 0)
  end,
  __newindex = function(t, name, value)
    if type(value) == "function" then
      rawset(t, name, value)
    else
      error("attempt to write to undeclared global variable " .. check_string(name, 2), 0)
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

-- Is _G under restrict_global_variables(true)? (Dovecot then panics on a missing
-- entry point: its lua_getglobal runs the erroring __index outside any pcall.)
local function globals_restricted()
  return getmetatable(_G) == strict_globals
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
-- Events (dlua-dovecot.c): tables with an `item` whose metatable holds the
-- methods. What Dovecot keeps in the C event lives in `events`, keyed by item:
-- its parent, its own log prefix, the request it belongs to (req:event()), its
-- name and fields. Log lines carry the prefixes of the event and its parents up
-- to the first one that replaced them.
local EVENT, PASSTHROUGH = "struct event", "struct event_passthrough"
local event_methods = {__name = EVENT}
event_methods.__index = event_methods
local passthrough_methods = {__name = PASSTHROUGH}
passthrough_methods.__index = passthrough_methods
local events = setmetatable({}, {__mode = "k"})
-- The passthrough event that was created and not logged yet (there is one per
-- process in Dovecot; a second one, or a method call on a logged one, crashes 2.3).
local pending_passthrough

local function new_event(parent, fields)
  local data = {parent = parent, request = parent and parent.request, fields = {}}
  for k, v in pairs(fields or {}) do data[k] = v end
  local item = {}
  events[item] = data
  return item, data
end

local function push_event(item)
  return setmetatable({item = item}, event_methods)
end

-- dlua_check_event / dlua_check_event_passthrough
local function check_event(self, kind)
  if type(self) ~= "table" then
    error(format("Bad argument #1, expected %s got %s", EVENT, type(self)), 0)
  end
  local data = events[rawget(self, "item")]
  if data == nil or (data.passthrough == true) ~= (kind == PASSTHROUGH) then
    error(format("authd: Bad argument #1, expected %s (Dovecot would crash on this table)", kind), 3)
  end
  if data.passthrough and data.logged then
    error("authd: this passthrough event was already logged (Dovecot would crash here)", 3)
  end
  return data
end

local function log_prefix(data)
  local parts = {}
  while data do
    if data.prefix then table.insert(parts, 1, data.prefix) end
    if data.replace then break end
    data = data.parent
  end
  return concat(parts)
end

local function event_log(data, level, message)
  local chain, fields, debug = {}, {}, false
  local d = data
  while d do chain[#chain + 1] = d d = d.parent end
  for i = #chain, 1, -1 do
    for k, v in pairs(chain[i].fields) do fields[k] = v end
    if chain[i].forced_debug ~= nil then debug = chain[i].forced_debug end
  end
  host.event_log(level, log_prefix(data) .. message, data.request, data.name, fields, debug)
end

-- "file.lua", line of the script code that called the API function (dlua_get_file_line)
local function caller_location()
  local info = getinfo(3, "Sl")
  if info == nil then return "<non-file location>", 0 end
  local source = info.source or ""
  local file
  if sub(source, 1, 1) ~= "@" then
    file = "<non-file location>"
  else
    file = source:match("([^/]*)$")
  end
  return file, info.currentline or 0
end

-- The methods both kinds of event objects have; `kind` picks the checker. `spec`
-- lists the argument checks after self (luaL_checkstring / luaL_checkinteger).
local function define_event_methods(methods, kind)
  local function method(name, spec, body)
    local nargs = #spec + 1
    methods[name] = function(...)
      check_args(select("#", ...), nargs)
      local self, a, b = ...
      local data = check_event(self, kind)
      if spec[1] then a = c_string(check_string(a, 2, true)) end
      if spec[2] == "string" then
        b = c_string(check_string(b, 3, true))
      elseif spec[2] == "integer" then
        b = check_integer(b, 3)
      end
      body(data, a, b)
      return self
    end
  end
  method("append_log_prefix", {"string"}, function(data, prefix)
    data.prefix, data.replace = prefix, false
  end)
  method("replace_log_prefix", {"string"}, function(data, prefix)
    data.prefix, data.replace = prefix, true
  end)
  -- Dovecot shows the source location only in exported events: nothing to keep here.
  method("set_always_log_source", {}, function() end)
  method("set_name", {"string"}, function(data, name) data.name = name end)
  method("add_str", {"string", "string"}, function(data, key, value) data.fields[key] = value end)
  method("add_int", {"string", "integer"}, function(data, key, value) data.fields[key] = value end)
  -- add_timeval takes whole seconds, as Dovecot reads it
  method("add_timeval", {"string", "integer"}, function(data, key, value) data.fields[key] = value end)
  method("inc_int", {"string", "integer"}, function(data, key, value)
    local old = data.fields[key]
    data.fields[key] = (type(old) == "number" and old or 0) + value
  end)
  for level, name in ipairs({"log_debug", "log_info", "log_warning", "log_error"}) do
    method(name, {"string"}, function(data, message)
      if data.passthrough then
        data.logged = true
        if pending_passthrough == data then pending_passthrough = nil end
      end
      event_log(data, level - 1, message)
    end)
  end
end

define_event_methods(event_methods, EVENT)
define_event_methods(passthrough_methods, PASSTHROUGH)

if v24 then
  -- 2.4.1+ events can force debug logging for themselves and their children.
  for name, value in pairs({set_forced_debug = true, unset_forced_debug = false}) do
    event_methods[name] = function(...)
      check_args(select("#", ...), 1)
      local self = ...
      check_event(self, EVENT).forced_debug = value
      return self
    end
  end
end

function event_methods.passthrough_event(...)
  check_args(select("#", ...), 1)
  local self = ...
  local parent = check_event(self, EVENT)
  local file, line = caller_location()
  if pending_passthrough then
    if not v24 then
      error("authd: Can't create multiple passthrough events - finish the earlier with a log call "
        .. "(Dovecot would crash here)", 2)
    end
    host.log(3, format("Passthrough event leaked by Lua script at %s:%d",
      pending_passthrough.file, pending_passthrough.line))
  end
  local item, data = new_event(parent, {passthrough = true, file = file, line = line})
  pending_passthrough = data
  return setmetatable({item = item}, passthrough_methods)
end

-- dovecot.event([parent]): a child of the script's event or of `parent`.
function dovecot_methods.event(...)
  check_args_in(select("#", ...), 0, 1)
  local parent
  if select("#", ...) == 1 then parent = check_event((...), EVENT) end
  return push_event((new_event(parent)))
end

-- auth_*_get_cache_key() as Script calls it: code 0 and the hook's one result, so the
-- "lookup" describer reports the value's type (and text, for strings and numbers).
local function cache_key_hook(name)
  local value = _G[name]()
  return 0, value
end

-- After a call: the passthrough event it left unlogged, as "file:line" (and forget it).
local function passthrough_leak()
  local data = pending_passthrough
  pending_passthrough = nil
  if data then return data.file .. ":" .. data.line end
end

---------------------------------------------------------------------------
-- 2.4's additions to the dovecot table.
if v24 then
  function dovecot_methods.gettimeofday()
    local sec, usec = host.gettimeofday()
    return {tv_sec = sec, tv_usec = usec}
  end

  function dovecot_methods.nanoseconds() return host.nanoseconds() end

  function dovecot_methods.microseconds() return host.microseconds() end

  function dovecot_methods.net_ip_family(...)
    check_args(select("#", ...), 1)
    return host.net_ip_family(check_string((...), 1, true))
  end

  local tab_escapes = {["\1"] = "\0011", ["\t"] = "\1t", ["\r"] = "\1r", ["\n"] = "\1n"}
  local tab_unescapes = {["0"] = "\0", ["1"] = "\1", t = "\t", r = "\r", n = "\n"}

  -- t_str_tabunescape on a C string; the result is pushed as a C string again.
  local function tab_unescape(s)
    return c_string((gsub(s, "\1(.?)", function(c) return tab_unescapes[c] or c end)))
  end

  function dovecot_methods.tabescape(...)
    check_args(select("#", ...), 1)
    local s = c_string(check_string((...), 1, true))
    return (gsub(s, "[\1\t\r\n]", tab_escapes))
  end

  function dovecot_methods.tabunescape(...)
    check_args(select("#", ...), 1)
    return tab_unescape(c_string(check_string((...), 1, true)))
  end

  function dovecot_methods.split_tabescaped(...)
    check_args(select("#", ...), 1)
    local s = c_string(check_string((...), 1, true))
    local out = {}
    if s == "" then return out end
    local start = 1
    while true do
      local tab = find(s, "\t", start, true)
      out[#out + 1] = tab_unescape(sub(s, start, (tab or 0) - 1))
      if not tab then break end
      start = tab + 1
    end
    return out
  end

  function dovecot_methods.var_expand(...)
    check_args(select("#", ...), 1)
    local template = c_string(check_string((...), 1, true))
    local ok, value = host.dovecot_var_expand(template)
    if not ok then error(format("failed to expand '%s': %s", template, value), 0) end
    return value
  end

  dovecot.base64 = {
    encode = function(...)
      check_args(select("#", ...), 1)
      return host.base64_encode(check_string((...), 1, true))
    end,
    decode = function(...)
      check_args(select("#", ...), 1)
      return host.base64_decode(check_string((...), 1, true))
    end,
  }

  -- Constants of builds with yield support; their objects are not reachable from auth.
  dovecot.dict = {ITERATE_FLAG_RECURSE = 1.0, ITERATE_FLAG_SORT_BY_KEY = 2.0,
    ITERATE_FLAG_SORT_BY_VALUE = 4.0, ITERATE_FLAG_NO_VALUE = 8.0, ITERATE_FLAG_EXACT_KEY = 16.0,
    ITERATE_FLAG_ASYNC = 32.0}
  dovecot.doveadm_client = {DOVEADM_PROXY_TTL = 5.0}
end

---------------------------------------------------------------------------
-- The request object: a fresh table per call with raw fields item, passdb,
-- userdb and the flags; variables and methods come from its metatable. A variable
-- is asked from Python (host.request_var) the first time the script reads it.
local request_methods = {}
local var_names = {}  -- the request variables of this dialect: name -> true
for _, name in ipairs(host.request_var_names) do var_names[name] = true end
local request_var = host.request_var
local var_cache = setmetatable({}, {__mode = "k"})  -- req -> {name -> value or false}

-- auth_lua_check_auth_request
local function check_request(req)
  if type(req) ~= "table" then
    error(format("Bad argument #1, expected auth_request got %s", type(req)), 0)
  end
  return rawget(req, "item")
end

local request_meta = {
  __index = function(req, key)
    if type(key) ~= "string" then
      key = check_string(key, 2)
    end
    if var_names[key] then
      local cache = var_cache[req]
      if cache == nil then
        cache = {}
        var_cache[req] = cache
      end
      local value = cache[key]
      if value == nil then
        value = request_var(rawget(req, "item"), key) or false
        cache[key] = value
      end
      if value then return value end
    end
    local method = request_methods[key]
    if method ~= nil then return method end
    return rawget(req, key)
  end,
}

for level, name in ipairs({"log_debug", "log_info", "log_warning", "log_error"}) do
  request_methods[name] = function(req, msg)
    local item = check_request(req)
    host.request_log(item, level - 1, check_string(msg, 2))
  end
end

function request_methods.password_verify(req, crypted, plain)
  local item = check_request(req)
  crypted = (type(crypted) == "number" and tostring(crypted)) or crypted
  plain = (type(plain) == "number" and tostring(plain)) or plain
  if v24 then
    if type(crypted) ~= "string" then error("Crypted password must not be nil", 0) end
    if type(plain) ~= "string" then error("Plain password must not be nil", 0) end
  end
  may_block("req:password_verify")  -- slow hashes (bcrypt, argon2) must not stall the loop
  local rc, err = host.password_verify(item, crypted, plain)
  return rc + 0.0, err
end

function request_methods.var_expand(req, template)
  local item = check_request(req)
  local ok, value = host.var_expand(item, check_string(template, 2))
  if not ok then error(value, 0) end
  return value
end

-- req:event(): a new child of the request's passdb/userdb event, which logs with
-- the prefix "lua(user,rip,<session>): ".
function request_methods.event(req)
  local item = check_request(req)
  local _, db = new_event(nil, {prefix = host.request_log_prefix(item), request = item})
  return push_event((new_event(db)))
end

if not v24 then  -- removed in 2.4.1
  function request_methods.response_from_template(req, template)
    local item = check_request(req)
    local ok, pairs_or_error = host.response_from_template(item,
      check_string(template, 2))
    if not ok then error(pairs_or_error, 0) end
    local result = {}
    for i = 1, #pairs_or_error, 2 do
      local value = pairs_or_error[i + 1]
      if value ~= false then result[pairs_or_error[i]] = value end
    end
    return result
  end
end

-- req.passdb and req.userdb: `item` is their only raw field; fields come from Python.
local function field_meta(userdb)
  local request_field = host.request_field
  return {
    __index = function(view, key)
      return request_field(rawget(view, "item"), userdb, check_string(key, 2))
    end,
  }
end
local passdb_meta, userdb_meta = field_meta(false), field_meta(true)

-- The `req` of one entry point call; `item` is the Python LuaRequest.
local function new_request(item, skip_password_check, seen_user_unknown, seen_internal_failure,
                           userdb_seen_internal_failure)
  return setmetatable({
    item = item,
    passdb = setmetatable({item = item}, passdb_meta),
    userdb = setmetatable({item = item}, userdb_meta),
    skip_password_check = skip_password_check,
    passdbs_seen_user_unknown = seen_user_unknown,
    passdbs_seen_internal_failure = seen_internal_failure,
    userdbs_seen_internal_failure = userdb_seen_internal_failure,
  }, request_meta)
end

---------------------------------------------------------------------------
-- I/O from scripts (HTTP, DNS): yield to authd's event loop when the call runs
-- as authd's coroutine and may yield here; otherwise block this thread.
local function yield_io(kind, payload)
  local running = coroutine.running()
  if isyieldable and drivers[running] and isyieldable() then
    return coroutine.yield("io", kind, payload)
  end
  if on_loop then host.run_in_threads(kind .. " I/O") end  -- it blocks the loop this once
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

-- auth_lua_export_table: the warnings, then the fields as key, value, ...; returns
-- that list, its length and the number of warnings, or nil and the reason Dovecot
-- 2.3.19 would crash on this table.
local function export_table(t)
  local fields, warnings, n = {}, {}, 0
  for key, value in next, t do
    if type(key) ~= "string" then
      local shown = type(key) == "number" and (" (" .. tostring(key) .. ")") or ""
      return nil, "result table has a " .. type(key) .. " key" .. shown
    end
    local vt = type(value)
    if vt == "number" then
      value = math_tointeger(value) or 0
    elseif vt == "boolean" then
      value = value and "yes" or "no"
    elseif vt ~= "string" then
      -- Dovecot names the type with lua_typename(L, -1): index -1 is LUA_TNONE.
      warnings[#warnings + 1] = "'" .. key .. "' has invalid value type no value - ignoring"
      value = false  -- 2.3.19 sets "", 2.4 skips the field
    end
    fields[n + 1] = key
    fields[n + 2] = value
    n = n + 2
  end
  local nwarnings = #warnings
  for i = 1, n do warnings[nwarnings + i] = fields[i] end
  return warnings, nwarnings + n, nwarnings
end

-- Describe the (code, data) pair an entry point returned, in plain values: is_number,
-- code, code's type, data's type, data as a string, then for a table the reason
-- Dovecot would crash on it, or nil, the number of warnings, the warnings and the
-- fields (lua_api.runtime reassembles them; a flat return needs no table conversion).
local function describe_result(code, data)
  local is_number, code_int = to_code(code)
  local dtype = type(data)
  if dtype == "table" then
    local list, n, nwarnings = export_table(data)
    if list == nil then return is_number, code_int, type(code), dtype, nil, n end
    return is_number, code_int, type(code), dtype, nil, nil, nwarnings, unpack(list, 1, n)
  end
  if dtype == "number" then  -- lua_isstring: a number is a string too
    return is_number, code_int, type(code), dtype, tostring(data)
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

local xpcall_passes_args = select(2, xpcall(function(x) return x end, message_handler, true)) == true

-- How finish_entry describes the results of modes other than "lookup".
local describers = {
  list = function(results) return describe_list(results[2]) end,
  init = function(results)
    local value = results[2]
    if type(value) ~= "number" then return type(value), nil end
    if math.type then return math.type(value), value end
    return value == math.floor(value) and "integer" or "float", value  -- Lua 5.1
  end,
  none = function() end,
}

local function index_global(name)
  return _G[name]
end

local function finish_entry(mode, ok, ...)
  if not ok then
    return "done", false, (...)
  end
  if mode == "lookup" then  -- the common case, without a results table
    return "done", true, describe_result(...)
  end
  return "done", true, describers[mode]({ok, ...})
end

local function run_entry(fn, mode, ...)
  if xpcall_passes_args then
    return finish_entry(mode, xpcall(fn, message_handler, ...))
  end
  -- Lua 5.1's xpcall takes no arguments for the function
  local n, args = pack(...)
  return finish_entry(mode, xpcall(function() return fn(unpack(args, 1, n)) end, message_handler))
end

-- The body of every call's coroutine: run `target` (a global's name, fetched at call
-- time like Dovecot's dlua_pcall, or a function) with a traceback handler, then
-- describe what it returned in plain values. Returns "done", ok, description... or
-- "done", false, error. Mode "request" builds the request table from its first five
-- arguments (see new_request) and describes the result like "lookup".
local function call_entry(target, mode, ...)
  local fn = target
  if type(target) == "string" then
    local found
    found, fn = pcall(index_global, target)
    if not found or type(fn) ~= "function" then
      return "done", false, "'" .. target .. "' is not a function", "missing", globals_restricted()
    end
  end
  if mode == "request" then
    return run_entry(fn, "lookup", new_request(...), select(6, ...))
  end
  return run_entry(fn, mode, ...)
end

-- Calls in progress by handle: lupa cannot hand Lua threads to Python and back.
local calls = {}
local last_handle = 0

-- A coroutine for one call; its first resume passes the target, mode and arguments,
-- and authd resumes it after each I/O it yields for.
local function start_call()
  local co = coroutine.create(call_entry)
  drivers[co] = true
  last_handle = last_handle + 1
  calls[last_handle] = co
  return last_handle
end

local function resumed(handle, co, ok, ...)
  if not ok then
    -- Only authd's own wrapper can fail here (e.g. out of memory).
    calls[handle] = nil
    return "done", false, message_handler((...))
  end
  if coroutine.status(co) == "dead" then calls[handle] = nil end
  return ...
end

local function resume(handle, ...)
  local co = calls[handle]
  return resumed(handle, co, coroutine.resume(co, ...))
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
  yield_io = yield_io,
  set_on_loop = set_on_loop,
  may_block = may_block,
  blocking_seen = get_blocking_seen,
  globals_restricted = globals_restricted,
  checks = {args = check_args, args_in = check_args_in, arg_error = arg_error, type_name = type_name, c_string = c_string},
  cache_key_hook = cache_key_hook,
  passthrough_leak = passthrough_leak,
}
