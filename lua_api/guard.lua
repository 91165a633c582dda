-- Guard rails around the prelude's call machinery (lua_api/runtime.py drives them).
--
-- Time: every call may carry a deadline. A count hook on the call's coroutine, and
-- on every coroutine a script creates, looks at the clock every `count` VM
-- instructions and raises once the deadline has passed; from then on it raises at
-- every instruction, so a script's pcall cannot swallow the timeout.
--
-- Memory: lupa's max_memory must apply only while script code runs (a "slice"),
-- never while lupa or Python push and read values from outside: an allocation
-- failure there aborts the process (Lua panic) or, inside a Python callback,
-- longjmps past the GIL and deadlocks it. On Lua 5.1-5.3 the garbage collector is
-- stopped at the same moments, because its finalizers raise errors there (a panic
-- too). Lua 5.4 turns finalizer errors into warnings, so its collector runs freely:
-- restarting it costs a collection step per slice, the biggest part of a trivial call.
-- Loaded once per state, right after the prelude.
local api, host = ...

local type, error, pcall, ipairs, pairs, setmetatable = type, error, pcall, ipairs, pairs, setmetatable
local collectgarbage = collectgarbage
local sethook, getinfo, traceback = debug.sethook, debug.getinfo, debug.traceback
local co_create, co_wrap, co_running, co_status =
  coroutine.create, coroutine.wrap, coroutine.running, coroutine.status
local clock, set_limit, count, limited = host.clock, host.set_limit, host.count, host.limited
local jit = jit
local stop_gc = _VERSION ~= "Lua 5.4"

-- Python callables are userdata with lupa's metatable; its original __call reaches
-- Python without the shield below (set_limit must not toggle itself).
local python_meta = debug.getregistry().POBJECT
local python_call = python_meta.__call

-- lupa looks up debug.traceback with lua_getglobal before every call into Lua, outside
-- any protected call: if a script removed `debug` and _G has an __index metamethod
-- (restrict_global_variables, strict.lua), that lookup may raise, and an unprotected
-- error is a Lua panic, which aborts the process. Put the library back first.
local globals, debug_lib, getmetatable_raw, rawget, rawset =
  _G, debug, debug.getmetatable, rawget, rawset

local function keep_lupa_safe()
  local d = rawget(globals, "debug")
  if d == nil then
    if getmetatable_raw(globals) == nil then return end
  elseif type(d) ~= "table" or rawget(d, "traceback") ~= nil or getmetatable_raw(d) == nil then
    return
  end
  rawset(globals, "debug", debug_lib)
end

local in_slice = false  -- script code of a call is running: the limits apply
local depth = 0         -- Python callbacks in progress within the slice
local current = nil     -- the running call: {deadline = clock value or nil, expired, where, escalated}

local function limits(on)
  if stop_gc then collectgarbage(on and "restart" or "stop") end
  if limited then python_call(set_limit, on) end
end

local function returned(ok, ...)
  depth = depth - 1
  if depth == 0 and in_slice then limits(true) end
  if not ok then error((...), 0) end
  return ...
end

-- Lift the limits while Python runs and lupa converts its arguments and results.
local function shielded(method)
  return function(...)
    if depth == 0 and in_slice then
      limits(false)
      keep_lupa_safe()  -- Python may call into Lua
    end
    depth = depth + 1
    return returned(pcall(method, ...))
  end
end

for _, name in ipairs({"__call", "__index", "__newindex", "__tostring"}) do
  python_meta[name] = shielded(python_meta[name])
end

-- Where the script was when its time ran out, without authd's frames.
local function script_traceback()
  local text = traceback("", 3):gsub("^\n", "")
  local cut = text:find("\n\t%[C%]: in function 'xpcall'")
  return cut and text:sub(1, cut - 1) or text
end

local TIMEOUT = "authd: [lua] call_timeout exceeded"

-- Every coroutine that carries the hook: the calls' own and the scripts'.
local hooked = setmetatable({}, {__mode = "k"})
local guard_hook

local function watch(co)
  hooked[co] = true
  sethook(co, guard_hook, "", (current and current.expired) and 1 or count)
end

guard_hook = function()
  local call = current
  if call == nil or call.deadline == nil then return end
  local co, main = co_running()
  if co == nil or main then return end  -- authd's own code (LuaJIT's hooks are global)
  if not call.expired then
    if clock() <= call.deadline then return end
    call.expired = true
    call.where = script_traceback()
    -- From now on every instruction fails, in the coroutines that resumed this one too.
    call.escalated = {}
    for other in pairs(hooked) do
      if co_status(other) ~= "dead" then
        sethook(other, guard_hook, "", 1)
        call.escalated[#call.escalated + 1] = other
      end
    end
  end
  error(TIMEOUT, 0)
end

if count > 0 then
  if jit then jit.off() end  -- compiled LuaJIT code never calls hooks

  coroutine.create = function(f)
    local co = co_create(f)
    watch(co)
    return co
  end

  coroutine.wrap = function(f)
    if type(f) ~= "function" then return co_wrap(f) end
    return co_wrap(function(...)
      watch((co_running()))
      return f(...)
    end)
  end

  -- Decided: a script's own hook would silently replace the guard, so it is an error.
  debug.sethook = function()
    error("debug.sethook() is not available: authd uses the debug hook to enforce [lua] call_timeout", 2)
  end
end

local start_call, resume, abandon, passthrough_leak =
  api.start_call, api.resume, api.abandon, api.passthrough_leak
local calls = {}

-- What log lines call the target.
api.entry_name = function(target, ...)
  if type(target) == "string" then return target end
  local info = getinfo(target, "S")
  if info.what == "main" then return "main chunk" end
  if type((...)) == "string" then return (...) end  -- the prelude's hooks get the entry's name
  return info.short_src .. ":" .. info.linedefined
end

-- A finished call: "done", the passthrough event it left unlogged (entry points only:
-- loading checks once after script_init), then ok and the results or the error.
local function done(call, ...)
  return "done", call and call.leaks and passthrough_leak() or nil, ...
end

local function finish(handle, ok, ...)
  in_slice, current = false, nil
  limits(false)
  keep_lupa_safe()
  local call = calls[handle]
  if call and call.expired then
    calls[handle] = nil
    abandon(handle)
    for _, co in ipairs(call.escalated) do  -- a script's coroutine may live on, suspended
      if co_status(co) ~= "dead" then sethook(co, guard_hook, "", count) end
    end
    return done(call, false, call.where, "timeout")
  end
  if not ok then  -- the machinery itself failed (out of memory in resume)
    calls[handle] = nil
    abandon(handle)
    local err = ...
    return done(call, false, type(err) == "string" and err or "authd: resuming the call failed", "broken")
  end
  if (...) == "done" then
    calls[handle] = nil
    return done(call, select(2, ...))
  end
  return ...
end

-- One slice: the call's script code runs until it yields for I/O or ends.
local function slice(handle, ...)
  current, in_slice, depth = calls[handle], true, 0
  if jit and count > 0 then sethook(guard_hook, "", count) end  -- undo a global escalation
  limits(true)
  return finish(handle, pcall(resume, handle, ...))
end

-- Start a call and run its first slice: `deadline` is a host.clock() value (nil for
-- none), the rest is the prelude's call_entry arguments. Returns the call's handle,
-- then what the slice gave: "io", kind, payload or "done", leak, ok, ...
api.call = function(deadline, target, mode, ...)
  local handle = start_call()
  calls[handle] = {deadline = deadline, leaks = mode ~= "none" and mode ~= "init"}
  return handle, slice(handle, target, mode, ...)
end

-- The next slice of a call that yielded for I/O, with the I/O's result.
api.resume = slice

-- Drop a suspended call; returns the passthrough event it left unlogged, if any.
api.abandon = function(handle)
  local call = calls[handle]
  calls[handle] = nil
  abandon(handle)
  if call and call.leaks then return passthrough_leak() end
end

if stop_gc then
  collectgarbage("stop")
else
  -- Every call leaves a little short-lived garbage (its coroutine, the request table):
  -- the generational collector keeps a state near its live size at the same CPU cost,
  -- where the incremental one lets it double between cycles.
  collectgarbage("generational")
end
