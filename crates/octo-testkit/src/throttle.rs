//! A TCP relay on 127.0.0.1 that can slow every connection down to a set
//! number of bytes per second in each direction, like a slow link: a large
//! transfer through it then takes long enough for a test to act in its
//! middle (kill the server sending it). Off until [`Throttle::limit`] sets a
//! rate; connections relayed before a change follow the new rate at once.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// Handle to a running relay; dropping it stops accepting (connections
/// relayed so far end when either side closes).
#[derive(Debug)]
pub struct Throttle {
    addr: SocketAddr,
    rate: watch::Sender<Option<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Throttle {
    /// Relays connections made to [`Throttle::addr`] to `upstream`, at full
    /// speed until [`Throttle::limit`] says otherwise.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let rate = watch::Sender::new(None);
        let rx = rate.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return; // the client sees its connection close
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    let a = tokio::spawn(pump(dr, uw, rx.clone()));
                    let b = tokio::spawn(pump(ur, dw, rx));
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Ok(Self { addr, rate, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// At most `bytes_per_second` each way on every connection (None: full
    /// speed).
    pub fn limit(&self, bytes_per_second: Option<u64>) {
        self.rate.send_replace(bytes_per_second.map(|r| r.max(1)));
    }
}

/// Copies `from` to `to`, pacing writes to the current rate; ends when either
/// side ends (closing `to`, so the other side sees the end too).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: watch::Receiver<Option<u64>>,
) {
    let mut buf = vec![0u8; 16 << 10];
    // Bytes written since `since` under the rate in force then.
    let mut paced: Option<(u64, Instant, u64)> = None;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let limit = *rate.borrow();
        match limit {
            None => paced = None,
            Some(r) => {
                let (bytes, since, _) = match paced {
                    Some(p) if p.2 == r => p,
                    _ => (0, Instant::now(), r),
                };
                let bytes = bytes + n as u64;
                // This chunk may leave once the rate allows all bytes so far.
                let due = since + Duration::from_secs_f64(bytes as f64 / r as f64);
                tokio::time::sleep_until(due).await;
                paced = Some((bytes, since, r));
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
