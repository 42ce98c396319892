//! A "remote site" on this machine: a network namespace joined to the test's
//! own namespace by one veth pair, for tests where the coordinator must not be
//! able to reach what a site's agent reaches.
//!
//! Topology of one [`Site`]:
//! ```text
//!   test namespace (coordinator, S3, RabbitMQ on 127.0.0.1)
//!        host_ip (198.18.B.1/30) ── veth ── site_ip (198.18.B.2/30)
//!                                            site namespace: its own 127.0.0.1
//!                                            (sshd, agent)
//! ```
//! Processes started in the site (`ip netns exec`) reach the test namespace
//! only through `host_ip`, where the harness exposes chosen services with a
//! [`TcpProxy`]; the test namespace has no route to the site's loopback, so a
//! server listening there is reachable from the site alone.
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544, reserved for network testing)
//! and exist only on the veth pair this harness creates; nothing is sent
//! anywhere else. Needs root (`ip netns`, veth); the namespace and its veth
//! pair are deleted on drop.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::Context;

use crate::proxy::TcpProxy;
use crate::util::random_hex;

/// A network namespace with a veth link to the test's namespace.
#[derive(Debug)]
pub struct Site {
    name: String,
    host_veth: String,
    host_ip: Ipv4Addr,
    site_ip: Ipv4Addr,
}

/// /30 blocks handed out in this process (a random start keeps parallel test
/// processes apart; a clash makes `ip addr add` fail loudly, not silently).
static NEXT_BLOCK: AtomicU32 = AtomicU32::new(u32::MAX);

fn next_block() -> u32 {
    let start = u32::from_str_radix(&random_hex(2), 16).unwrap_or(0) % 32_768;
    let _ = NEXT_BLOCK.compare_exchange(u32::MAX, start, Ordering::SeqCst, Ordering::SeqCst);
    NEXT_BLOCK.fetch_add(1, Ordering::SeqCst) % 32_768
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run `ip` (iproute2; needs root)")?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Site {
    /// Creates the namespace, the veth pair and their addresses.
    pub fn create() -> Site {
        Self::try_create().unwrap_or_else(|e| panic!("create a site namespace: {e:#}"))
    }

    fn try_create() -> anyhow::Result<Site> {
        let tag = random_hex(4);
        let block = next_block();
        // 198.18.0.0/15 as 32768 blocks of 4 addresses: .1 host side, .2 site side.
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + block * 4;
        let site = Site {
            name: format!("ferry-site-{tag}"),
            host_veth: format!("fsh{tag}"),
            host_ip: Ipv4Addr::from(base + 1),
            site_ip: Ipv4Addr::from(base + 2),
        };
        let site_veth = format!("fss{tag}");
        ip(&["netns", "add", &site.name])?;
        // From here on, Drop cleans up whatever was made.
        ip(&[
            "link",
            "add",
            &site.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &site_veth,
        ])?;
        ip(&["link", "set", &site_veth, "netns", &site.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", site.host_ip),
            "dev",
            &site.host_veth,
        ])?;
        ip(&["link", "set", &site.host_veth, "up"])?;
        let ns = |args: &[&str]| {
            let mut all = vec!["-n", site.name.as_str()];
            all.extend_from_slice(args);
            ip(&all)
        };
        ns(&[
            "addr",
            "add",
            &format!("{}/30", site.site_ip),
            "dev",
            &site_veth,
        ])?;
        ns(&["link", "set", &site_veth, "up"])?;
        ns(&["link", "set", "lo", "up"])?;
        Ok(site)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The test namespace's end of the link, as seen from the site.
    pub fn host_ip(&self) -> IpAddr {
        IpAddr::V4(self.host_ip)
    }

    /// The site's end of the link.
    pub fn site_ip(&self) -> IpAddr {
        IpAddr::V4(self.site_ip)
    }

    /// Makes `target` (a service of the test namespace, e.g. the coordinator
    /// or S3 on 127.0.0.1) reachable from the site at the returned proxy's
    /// address on [`Site::host_ip`].
    pub async fn expose(&self, target: SocketAddr) -> TcpProxy {
        TcpProxy::start_on(self.host_ip(), target).await
    }

    /// Runs `program args...` inside the site; returns whether it exited 0.
    pub fn run(&self, program: &str, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // Deleting the namespace removes the site's veth end and with it the pair.
        let _ = ip(&["link", "del", &self.host_veth]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
