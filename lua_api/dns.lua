-- dovecot.dns_client (lua_api/dns.py): DNS lookups for auth scripts, shaped like
-- Dovecot's lib-lua dns_client object: methods in the metatable, called with ':',
-- an optional event as the last argument, and nil, error, code on failure. The
-- lookups yield to authd's event loop (or block where Lua cannot yield).
-- Loaded once per state, after the prelude.
local yield_io, io_kind = ...

local type, select, tostring, error, rawequal, setmetatable =
  type, select, tostring, error, rawequal, setmetatable
local format = string.format

local client = {}

-- DLUA_REQUIRE_ARGS_IN(L, 2, 3), the client as self, luaL_checkstring for the name.
-- The methods tail-call this, so level 2 is the script line that called them.
local function query(op, fname, ...)
  local n = select("#", ...)
  if n < 2 or n > 3 then
    error(format("expected %d to %d arguments, got %d", 2, 3, n), 0)
  end
  local self, name = ...
  if not rawequal(self, client) then
    error(format("bad argument #1 to '%s' (dns_client expected, got %s)", fname, type(self)), 2)
  end
  if type(name) == "number" then
    name = tostring(name)
  elseif type(name) ~= "string" then
    error(format("bad argument #1 to '%s' (string expected, got %s)", fname, type(name)), 2)
  end
  local result = yield_io(io_kind, {op = op, name = name})
  if result.error then return nil, result.error, result.code end
  return result.values
end

setmetatable(client, {
  __name = "struct dns_client",
  __index = {
    lookup = function(...) return query("lookup", "lookup", ...) end,
    lookup_a = function(...) return query("a", "lookup_a", ...) end,
    lookup_txt = function(...) return query("txt", "lookup_txt", ...) end,
  },
})

dovecot.dns_client = client
