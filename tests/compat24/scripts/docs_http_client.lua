-- dialect: 2.4
-- The "Example HTTP Client Code" of Dovecot's lib-lua documentation
-- (docs/core/admin/lua/lib_lua.md). Its client options are 2.3 names: 2.4 rejects
-- `timeout` when the client is created at load time, and `return OK, ""` would be
-- an invalid result on 2.4.1+ anyway.

local json = require "cjson"
local http_client = dovecot.http.client {
    timeout = 10000;
    max_attempts = 3;
    debug = true;
}

function auth_password_verify(request, password)
    local auth_request = http_client:request {
        url = "https://endpoint/";
        method = "POST";
    }
    local req = {user=request.user, password=password}
    auth_request:set_payload(json.encode(req))
    local auth_response = auth_request:submit()
    local resp_status = auth_response:status()

    if resp_status == 200
    then
        return dovecot.auth.PASSDB_RESULT_OK, ""
    else
        return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
    end
end
