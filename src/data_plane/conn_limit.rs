//! Connection limits (SPEC §14): `[proxy] max_connections` over all
//! listeners and `max_connections_per_client` per client address.
//!
//! Taken only at accept and released at close, never per request: the
//! total is one atomic; per-client counts live in a map sharded by address
//! (a short lock on one of [`SHARDS`] shards at accept and at close). Both
//! limits are atomics, so a reload changes them for the next accept while
//! established connections are left alone.
//!
//! A [`ConnSlot`] is the connection's place: it lives as long as the
//! connection, including an upgraded (WebSocket) stream after hyper has let
//! go of it, and also keeps the connection in `switchyard_open_connections`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::IntGauge;

/// Shards of the per-client map (a power of two: see [`shard_index`]).
const SHARDS: usize = 64;

/// Why a connection was refused: the `reason` label of
/// `switchyard_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `proxy.max_connections` reached.
    MaxConnections,
    /// `proxy.max_connections_per_client` reached for this client.
    MaxConnectionsPerClient,
    /// `accept` failed for lack of file descriptors (`EMFILE`, `ENFILE`).
    NoFileDescriptors,
}

impl Refused {
    /// Every reason, for the metric's series to exist from the start.
    pub(crate) const ALL: [Refused; 3] = [
        Refused::MaxConnections,
        Refused::MaxConnectionsPerClient,
        Refused::NoFileDescriptors,
    ];

    /// The metric label.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refused::MaxConnections => "max_connections",
            Refused::MaxConnectionsPerClient => "max_connections_per_client",
            Refused::NoFileDescriptors => "no_file_descriptors",
        }
    }
}

/// Counts open client connections against the limits.
#[derive(Debug)]
pub(crate) struct ConnLimiter {
    total: AtomicUsize,
    max_total: AtomicUsize,
    /// 0 = off.
    max_per_client: AtomicUsize,
    shards: [Mutex<HashMap<IpAddr, usize>>; SHARDS],
}

impl ConnLimiter {
    /// A limiter with these limits (`max_per_client` 0 = off).
    pub(crate) fn new(max_total: usize, max_per_client: usize) -> Arc<ConnLimiter> {
        Arc::new(ConnLimiter {
            total: AtomicUsize::new(0),
            max_total: AtomicUsize::new(max_total),
            max_per_client: AtomicUsize::new(max_per_client),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        })
    }

    /// New limits (reload): they apply from the next accept; connections
    /// already open stay, even above a lowered limit.
    pub(crate) fn set_limits(&self, max_total: usize, max_per_client: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_client.store(max_per_client, Ordering::Relaxed);
    }

    /// Connections open now.
    #[cfg(test)]
    fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Connections open now from `ip` (as counted: IPv6 by /64).
    #[cfg(test)]
    fn open_from(&self, ip: IpAddr) -> usize {
        let key = client_key(ip);
        self.shard(key).get(&key).copied().unwrap_or(0)
    }

    /// Takes a place for a new connection from `ip`, counted in `gauge`
    /// while it lives; or says which limit refused it.
    pub(crate) fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        gauge: &IntGauge,
    ) -> Result<ConnSlot, Refused> {
        let max_total = self.max_total.load(Ordering::Relaxed);
        if self.total.fetch_add(1, Ordering::AcqRel) >= max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::MaxConnections);
        }
        let max_per_client = self.max_per_client.load(Ordering::Relaxed);
        let key = client_key(ip);
        {
            let mut shard = self.shard(key);
            let n = shard.entry(key).or_insert(0);
            // Refused only when *n > 0: no empty entry is left behind.
            if max_per_client > 0 && *n >= max_per_client {
                drop(shard);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::MaxConnectionsPerClient);
            }
            *n += 1;
        }
        gauge.inc();
        Ok(ConnSlot {
            limiter: Arc::clone(self),
            key,
            gauge: gauge.clone(),
        })
    }

    fn shard(&self, key: IpAddr) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Nothing panics while holding a shard; recover the map anyway.
        self.shards[shard_index(key)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn release(&self, key: IpAddr) {
        {
            let mut shard = self.shard(key);
            if let Some(n) = shard.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    shard.remove(&key);
                }
            }
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The address a client is counted under: IPv4 as is (also when mapped
/// into IPv6), IPv6 by its /64 (one host usually holds a whole /64, so
/// counting single addresses would let it open as many as it likes).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// `0..SHARDS`.
fn shard_index(key: IpAddr) -> usize {
    let x: u64 = match key {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let b = u128::from(v6);
            // Truncations intended: the two halves folded together.
            (b >> 64) as u64 ^ b as u64
        }
    };
    // Fibonacci hashing: neighbouring addresses land on different shards;
    // the top log2(SHARDS) bits.
    (x.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARDS.trailing_zeros())) as usize
}

/// A connection's place in the limits and the open-connections gauge;
/// given back when dropped.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
    gauge: IntGauge,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.gauge.dec();
        self.limiter.release(self.key);
    }
}

/// Raises this process's soft limit on open files to its hard limit, as
/// HAProxy does at start: Debian's default soft limit of 1 024 would cap
/// the proxy at about 500 proxied connections (each holds a client and an
/// upstream socket), far below what `max_connections` allows, while the
/// hard limit (usually 524 288 under systemd) is the administrator's real
/// ceiling. Returns the soft limit before and after.
pub(crate) fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let (before, _) = rlimit::Resource::NOFILE.get()?;
    let after = rlimit::increase_nofile_limit(u64::MAX)?;
    Ok((before, after))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The soft limit ends at the hard one (read back from the kernel).
    #[cfg(target_os = "linux")]
    #[test]
    fn open_files_limit_is_raised_to_the_hard_limit() {
        let (_, after) = raise_open_files_limit().unwrap();
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[3], after.to_string(), "{line}");
        assert_eq!(fields[3], fields[4], "soft = hard: {line}");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn limits_total_and_per_client() {
        let g = IntGauge::new("g", "g").unwrap();
        let l = ConnLimiter::new(3, 2);
        let a1 = l.try_acquire(ip("10.0.0.1"), &g).unwrap();
        let a2 = l.try_acquire(ip("10.0.0.1"), &g).unwrap();
        assert_eq!(
            l.try_acquire(ip("10.0.0.1"), &g).unwrap_err(),
            Refused::MaxConnectionsPerClient
        );
        // The same client as IPv4-mapped IPv6 is the same client.
        assert_eq!(
            l.try_acquire(ip("::ffff:10.0.0.1"), &g).unwrap_err(),
            Refused::MaxConnectionsPerClient
        );
        let b1 = l.try_acquire(ip("10.0.0.2"), &g).unwrap();
        assert_eq!(
            l.try_acquire(ip("10.0.0.3"), &g).unwrap_err(),
            Refused::MaxConnections
        );
        assert_eq!((l.open(), g.get()), (3, 3));
        drop(a1);
        assert_eq!(l.open_from(ip("10.0.0.1")), 1);
        let c1 = l.try_acquire(ip("10.0.0.3"), &g).unwrap();
        // Lowered on reload: nothing open is closed, nothing new admitted.
        l.set_limits(1, 0);
        assert_eq!(
            l.try_acquire(ip("10.0.0.4"), &g).unwrap_err(),
            Refused::MaxConnections
        );
        drop((a2, b1, c1));
        assert_eq!((l.open(), g.get()), (0, 0));
        assert_eq!(l.open_from(ip("10.0.0.1")), 0);
        assert!(l.shards.iter().all(|s| s.lock().unwrap().is_empty()));
        // Off: any number from one client, up to the total.
        l.set_limits(10, 0);
        let many: Vec<_> = (0..10)
            .map(|_| l.try_acquire(ip("10.0.0.1"), &g).unwrap())
            .collect();
        assert_eq!(l.open_from(ip("10.0.0.1")), 10);
        drop(many);
    }

    #[test]
    fn ipv6_counted_by_64() {
        let g = IntGauge::new("g", "g").unwrap();
        let l = ConnLimiter::new(10, 1);
        let _a = l.try_acquire(ip("2001:db8:1:2::1"), &g).unwrap();
        assert_eq!(
            l.try_acquire(ip("2001:db8:1:2:ffff::9"), &g).unwrap_err(),
            Refused::MaxConnectionsPerClient
        );
        assert!(l.try_acquire(ip("2001:db8:1:3::1"), &g).is_ok());
    }
}
