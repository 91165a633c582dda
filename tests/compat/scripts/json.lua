-- A small pure-Lua JSON module, the kind Dovecot Lua scripts load with require("json")
-- (Mailu, userli). Written for authd's compat tests; Lua 5.3+.
--   json.encode(value) -> string   (tables with keys 1..n become arrays, others objects;
--                                    object keys are sorted so the output is deterministic)
--   json.decode(text)  -> value     (null -> nil; integral numbers without '.'/'e' are integers)
local json = {}

local escapes = {
  ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
}

local function encode_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return escapes[c] or string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function is_array(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  for i = 1, n do
    if t[i] == nil then return false end
  end
  return true
end

local encode_value

local function encode_table(t)
  local parts = {}
  if next(t) ~= nil and is_array(t) then
    for _, v in ipairs(t) do parts[#parts + 1] = encode_value(v) end
    return "[" .. table.concat(parts, ",") .. "]"
  end
  local keys = {}
  for k in pairs(t) do
    if type(k) ~= "string" then error("json.encode: object keys must be strings") end
    keys[#keys + 1] = k
  end
  table.sort(keys)
  for _, k in ipairs(keys) do parts[#parts + 1] = encode_string(k) .. ":" .. encode_value(t[k]) end
  return "{" .. table.concat(parts, ",") .. "}"
end

encode_value = function(v)
  local kind = type(v)
  if kind == "nil" then return "null" end
  if kind == "boolean" then return tostring(v) end
  if kind == "string" then return encode_string(v) end
  if kind == "table" then return encode_table(v) end
  if kind == "number" then
    if v ~= v or v == math.huge or v == -math.huge then error("json.encode: cannot encode " .. tostring(v)) end
    if math.type(v) == "integer" then return tostring(v) end
    return string.format("%.14g", v)
  end
  error("json.encode: cannot encode a " .. kind)
end

json.encode = encode_value

local decode_value

local function decode_error(text, pos, what)
  error(string.format("json.decode: %s at position %d", what, pos), 0)
end

local function skip(text, pos)
  return text:find("[^ \t\r\n]", pos) or #text + 1
end

local function decode_string(text, pos)
  local out, i = {}, pos + 1
  while true do
    local c = text:sub(i, i)
    if c == "" then decode_error(text, i, "unterminated string") end
    if c == '"' then return table.concat(out), i + 1 end
    if c == "\\" then
      local e = text:sub(i + 1, i + 1)
      local simple = ({b = "\b", f = "\f", n = "\n", r = "\r", t = "\t", ['"'] = '"', ["\\"] = "\\", ["/"] = "/"})[e]
      if simple then
        out[#out + 1] = simple
        i = i + 2
      elseif e == "u" then
        local hex = text:sub(i + 2, i + 5)
        if not hex:match("^%x%x%x%x$") then decode_error(text, i, "bad \\u escape") end
        local code = tonumber(hex, 16)
        i = i + 6
        if code >= 0xD800 and code <= 0xDBFF and text:sub(i, i + 1) == "\\u" then
          local low = tonumber(text:sub(i + 2, i + 5), 16)
          if low and low >= 0xDC00 and low <= 0xDFFF then
            code = 0x10000 + (code - 0xD800) * 0x400 + (low - 0xDC00)
            i = i + 6
          end
        end
        out[#out + 1] = utf8.char(code)
      else
        decode_error(text, i, "bad escape")
      end
    else
      out[#out + 1] = c
      i = i + 1
    end
  end
end

local function decode_number(text, pos)
  local literal = text:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
  if literal == nil or literal == "" then decode_error(text, pos, "bad number") end
  local value = tonumber(literal)
  if value == nil then decode_error(text, pos, "bad number") end
  return value, pos + #literal
end

local function decode_array(text, pos)
  local out, i = {}, skip(text, pos + 1)
  if text:sub(i, i) == "]" then return out, i + 1 end
  while true do
    local value
    value, i = decode_value(text, i)
    out[#out + 1] = value
    i = skip(text, i)
    local c = text:sub(i, i)
    if c == "]" then return out, i + 1 end
    if c ~= "," then decode_error(text, i, "expected ',' or ']'") end
    i = skip(text, i + 1)
  end
end

local function decode_object(text, pos)
  local out, i = {}, skip(text, pos + 1)
  if text:sub(i, i) == "}" then return out, i + 1 end
  while true do
    if text:sub(i, i) ~= '"' then decode_error(text, i, "expected a string key") end
    local key
    key, i = decode_string(text, i)
    i = skip(text, i)
    if text:sub(i, i) ~= ":" then decode_error(text, i, "expected ':'") end
    local value
    value, i = decode_value(text, skip(text, i + 1))
    out[key] = value
    i = skip(text, i)
    local c = text:sub(i, i)
    if c == "}" then return out, i + 1 end
    if c ~= "," then decode_error(text, i, "expected ',' or '}'") end
    i = skip(text, i + 1)
  end
end

local literals = {["true"] = true, ["false"] = false, ["null"] = json}

decode_value = function(text, pos)
  pos = skip(text, pos)
  local c = text:sub(pos, pos)
  if c == "{" then return decode_object(text, pos) end
  if c == "[" then return decode_array(text, pos) end
  if c == '"' then return decode_string(text, pos) end
  if c == "-" or c:match("%d") then return decode_number(text, pos) end
  for word, value in pairs(literals) do
    if text:sub(pos, pos + #word - 1) == word then
      if value == json then return nil, pos + #word end
      return value, pos + #word
    end
  end
  decode_error(text, pos, "unexpected character")
end

function json.decode(text)
  if type(text) ~= "string" then error("json.decode: expected a string, got " .. type(text), 0) end
  local value, pos = decode_value(text, 1)
  pos = skip(text, pos)
  if pos <= #text then decode_error(text, pos, "trailing data") end
  return value
end

return json
