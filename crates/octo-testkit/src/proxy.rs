//! A TCP relay on 127.0.0.1 that can go silent: `freeze` stops moving bytes on
//! every connection relayed so far, in both directions, but keeps the sockets open, like a cable cut or a
//! NAT entry that expired. Only keepalives can notice such a dead path. Later
//! connections are relayed normally (the path came back).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Handle to a running relay; dropping it stops accepting.
#[derive(Debug)]
pub struct Blackhole {
    addr: SocketAddr,
    frozen: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Blackhole {
    /// Relays connections made to [`Blackhole::addr`] to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let frozen = watch::Sender::new(0u64);
        let rx = frozen.subscribe();
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let rx = rx.clone();
                let generation = *rx.borrow();
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = down.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    let a = tokio::spawn(pump(dr, uw, rx.clone(), generation));
                    let b = tokio::spawn(pump(ur, dw, rx, generation));
                    let _ = tokio::join!(a, b);
                });
            }
        });
        Ok(Self { addr, frozen, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop relaying on every connection made so far (sockets stay open, bytes
    /// go nowhere). New connections are relayed.
    pub fn freeze(&self) {
        self.frozen.send_modify(|g| *g += 1);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<u64>,
    generation: u64,
) {
    let mut buf = vec![0u8; 64 << 10];
    let check = frozen.clone();
    loop {
        tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let frozen_now = *check.borrow() > generation;
                    if frozen_now {
                        continue; // swallow
                    }
                    if to.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            },
            r = async { frozen.wait_for(|g| *g > generation).await.map(|_| ()) } => {
                if r.is_err() { return; }
                // Frozen: hold the sockets open and swallow whatever arrives.
                let mut sink = vec![0u8; 64 << 10];
                loop {
                    match from.read(&mut sink).await {
                        Ok(0) | Err(_) => { std::future::pending::<()>().await; }
                        Ok(_) => {}
                    }
                }
            }
        }
    }
}
