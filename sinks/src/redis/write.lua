-- Compare-and-set of one vehicle's latest state (newest by event time wins).
--
-- KEYS: vehicle hash, geo set, expiry set. ARGV: ttl in ms, vehicle id, then per frame six
-- values: kind, ts, seq, contract JSON, lon, lat (lon/lat empty for a diagnostic, or for a
-- location a geo set cannot index, which then removes the vehicle's older position).
-- `ts` and `seq` are compared exactly as decimal integers (they may exceed 2^53).
-- Returns how many frames were newer and written.
local function cmp(a, b)
  local na, nb = string.sub(a, 1, 1) == '-', string.sub(b, 1, 1) == '-'
  if na ~= nb then if na then return -1 else return 1 end end
  local r
  if a == b then return 0
  elseif #a ~= #b then if #a < #b then r = -1 else r = 1 end
  elseif a < b then r = -1 else r = 1 end
  if na then return -r end
  return r
end
local wrote = 0
for i = 3, #ARGV, 6 do
  local kind, ts, seq = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local held = redis.call('HMGET', KEYS[1], kind .. '_ts', kind .. '_seq')
  local newer = true
  if held[1] then
    local c = cmp(ts, held[1])
    if c < 0 or (c == 0 and cmp(seq, held[2] or '0') <= 0) then newer = false end
  end
  if newer then
    redis.call('HSET', KEYS[1], kind, ARGV[i + 3], kind .. '_ts', ts, kind .. '_seq', seq)
    if kind == 'location' then
      if ARGV[i + 4] ~= '' then
        redis.call('GEOADD', KEYS[2], ARGV[i + 4], ARGV[i + 5], ARGV[2])
      else
        redis.call('ZREM', KEYS[2], ARGV[2])
      end
    end
    wrote = wrote + 1
  end
end
if wrote > 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[1]), ARGV[2])
end
return wrote
