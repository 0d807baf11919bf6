//! The Lua scripts that make the lock protocol's compare-and-set steps atomic.

use redis::Script;
use std::sync::LazyLock;

/// Deletes `KEYS[1]` if its value starts with `ARGV[1]`: the refused token's fingerprint.
pub(super) static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1])) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// Deletes the lock `KEYS[1]` if `ARGV[1]` still holds it.
pub(super) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0",
    )
});

/// Sets the lease of the lock `KEYS[1]` to `ARGV[2]` ms if `ARGV[1]` still holds it.
pub(super) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0",
    )
});

/// Stores the token `ARGV[1]` at `KEYS[1]` for `ARGV[2]` ms, unless `ARGV[3]` is `clear` and
/// a sealed token is stored there: a process without the encryption key never replaces the
/// token of the processes with it. A stored token ends the failures recorded at `KEYS[2]`.
/// Returns 1 if stored.
pub(super) static STORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if ARGV[3] == 'clear' then
  local v = redis.call('GET', KEYS[1])
  if v and string.match(v, '^[^:]*:xc20p:') then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
return 1",
    )
});

/// Counts a failed fetch at `KEYS[1]`: the count of failures in a row, kept for the cool-down
/// (`ARGV[1]` ms doubled for each failure after the first, at most `ARGV[2]` ms) plus
/// `ARGV[3]` ms, after which the count is forgotten. A PTTL over `ARGV[3]` means the cool-down
/// runs: no clock but Redis's is involved. Returns the count.
pub(super) static FAIL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local n = (tonumber(redis.call('GET', KEYS[1])) or 0) + 1
local cooldown = tonumber(ARGV[1]) * 2 ^ math.min(n - 1, 16)
cooldown = math.min(cooldown, tonumber(ARGV[2]))
redis.call('SET', KEYS[1], n, 'PX', math.floor(cooldown) + tonumber(ARGV[3]))
return n",
    )
});
