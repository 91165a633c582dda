-- io.popen as Lua 5.4's, on top of lua_api/popen.py (lupa's Lua has none).
-- Loaded once per state after the prelude: `may_block` moves the call off the event
-- loop first (the command blocks its thread), `run_shell` runs the command.
local may_block, run_shell = ...

local type, tostring, tonumber, setmetatable, getmetatable, error, select =
  type, tostring, tonumber, setmetatable, getmetatable, error, select
local unpack = table.unpack or unpack
local find, sub, match, concat = string.find, string.sub, string.match, table.concat

local methods = {}
local meta = {__index = methods, __name = "FILE*"}
meta.__tostring = function(f) return f.closed and "file (closed)" or "file (popen)" end

local function check_open(f)
  if getmetatable(f) ~= meta then error("bad argument #1 (FILE* expected)", 3) end
  if f.closed then error("attempt to use a closed file", 3) end
end

local function read_one(f, format)
  local data, pos = f.data, f.pos
  if type(format) == "number" then
    if pos > #data then return nil end
    f.pos = pos + format
    return sub(data, pos, pos + format - 1)
  end
  format = tostring(format):gsub("^%*", "")
  local kind = sub(format, 1, 1)
  if kind == "a" then
    f.pos = #data + 1
    return sub(data, pos)
  elseif kind == "l" or kind == "L" then
    if pos > #data then return nil end
    local stop = find(data, "\n", pos, true)
    f.pos = stop and stop + 1 or #data + 1
    if kind == "L" or not stop then return sub(data, pos, stop or #data) end
    return sub(data, pos, stop - 1)
  elseif kind == "n" then
    local number = match(data, "^%s*([-+]?[%w%.]+)", pos)
    local value = number and tonumber(number)
    if value == nil then return nil end
    f.pos = pos + #match(data, "^%s*[-+]?[%w%.]+", pos)
    return value
  end
  error("bad argument #1 to 'read' (invalid format)", 3)
end

function methods.read(f, ...)
  check_open(f)
  if f.mode ~= "r" then return nil, "Bad file descriptor", 9 end
  local n = select("#", ...)
  if n == 0 then return read_one(f, "l") end
  local out = {}
  for i = 1, n do
    out[i] = read_one(f, (select(i, ...)))
    if out[i] == nil then return unpack(out, 1, i) end
  end
  return unpack(out, 1, n)
end

function methods.lines(f, ...)
  check_open(f)
  local formats = {...}
  if #formats == 0 then formats[1] = "l" end
  return function() return f:read(unpack(formats)) end
end

function methods.write(f, ...)
  check_open(f)
  if f.mode ~= "w" then return nil, "Bad file descriptor", 9 end
  for i = 1, select("#", ...) do
    local value = select(i, ...)
    if type(value) ~= "string" and type(value) ~= "number" then
      error("bad argument #" .. i .. " to 'write' (string expected, got " .. type(value) .. ")", 2)
    end
    f.chunks[#f.chunks + 1] = tostring(value)
  end
  return f
end

function methods.flush(f) check_open(f) return f end
function methods.setvbuf(f) check_open(f) return true end

function methods.close(f)
  check_open(f)
  f.closed = true
  local kind, code = f.kind, f.code
  if f.mode == "w" then
    may_block("io.popen")
    local _
    _, kind, code = run_shell(f.command, concat(f.chunks))
  end
  if kind == "exit" and code == 0 then return true, kind, code end
  return nil, kind, code
end

io.popen = function(command, mode)
  if type(command) ~= "string" and type(command) ~= "number" then
    error("bad argument #1 to 'popen' (string expected, got " .. type(command) .. ")", 2)
  end
  mode = mode or "r"
  if mode ~= "r" and mode ~= "w" then error("bad argument #2 to 'popen' (invalid mode)", 2) end
  local f = {command = tostring(command), mode = mode, closed = false}
  if mode == "r" then
    may_block("io.popen")
    f.data, f.kind, f.code = run_shell(f.command, nil)
    f.pos = 1
  else
    f.chunks = {}
  end
  return setmetatable(f, meta)
end
