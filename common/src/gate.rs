//! A switch on a set of connections: open, paused or cut.
//!
//! `edgepool-swarm` runs thousands of virtual agents in one process and
//! has to make one of them look frozen (SIGSTOP: sockets open, nothing
//! moves), cut off (a pulled cable that resets) or dead, without touching
//! the others. It gives each virtual agent a gate for its manager link and
//! one for its peer links; the agent's TLS plumbing (`tls::channel_gated`,
//! `tls::tls_incoming_gated`) wraps every socket it opens or accepts in
//! [`Gated`]. A real agent passes no gate: `Gated` then forwards each call
//! after one `Option` check.
//!
//! - *Open*: bytes flow.
//! - *Paused*: reads and writes stay pending (the kernel buffers fill, the
//!   other side sees silence), new connections are made but their TLS
//!   handshake stalls; they all resume on `open`.
//! - *Cut*: every read and write fails at once with `ConnectionReset` (the
//!   connection closes), new dials are refused and accepted connections
//!   are dropped.
//!
//! A gate can also carry a limit on the TLS handshakes its owner's dials
//! run at once, shared between gates (`Gate::limited`): ten thousand virtual
//! agents reconnecting together would otherwise run ten thousand client
//! handshakes on two threads, and the agents already connected would wait
//! seconds for their turn, which a real agent on its own machine never does.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a gate lets through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GateState {
    #[default]
    Open,
    Paused,
    Cut,
}

/// A switch shared by every connection it was given to. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct Gate {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: AtomicU64,
    shared: Mutex<Shared>,
    /// Handshakes of outgoing connections at once (shared; None: no limit).
    dials: Option<Arc<tokio::sync::Semaphore>>,
}

#[derive(Debug, Default)]
struct Shared {
    state: GateState,
    /// The tasks waiting on each connection (read, write), woken on every
    /// change so a pause ends and a cut is noticed at once.
    waiting: HashMap<u64, [Option<Waker>; 2]>,
}

impl Gate {
    pub fn new() -> Self {
        Gate::default()
    }

    /// A gate whose dials (TCP connect and TLS handshake) take a permit of
    /// `dials` first and hold it until the handshake ends.
    pub fn limited(dials: Arc<tokio::sync::Semaphore>) -> Self {
        Gate {
            inner: Arc::new(Inner {
                dials: Some(dials),
                ..Inner::default()
            }),
        }
    }

    /// Waits for a dial permit (None at once when the gate has no limit).
    pub async fn dial_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.inner.dials.clone()?.acquire_owned().await.ok()
    }

    pub fn state(&self) -> GateState {
        self.lock().state
    }

    /// Lets bytes flow again (after a pause or a cut).
    pub fn open(&self) {
        self.set(GateState::Open);
    }

    /// Holds every byte, keeping the connections open.
    pub fn pause(&self) {
        self.set(GateState::Paused);
    }

    /// Resets every connection and refuses new ones.
    pub fn cut(&self) {
        self.set(GateState::Cut);
    }

    pub fn set(&self, state: GateState) {
        let wakers: Vec<Waker> = {
            let mut shared = self.lock();
            shared.state = state;
            shared
                .waiting
                .values_mut()
                .flat_map(|w| w.iter_mut().filter_map(Option::take))
                .collect()
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Wraps a connection in this gate.
    pub fn wrap<T>(&self, io: T) -> Gated<T> {
        Gated {
            io,
            gate: Some((
                self.clone(),
                self.inner.next_id.fetch_add(1, Ordering::Relaxed),
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.inner
            .shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Remembers who waits on connection `id` in direction `dir`.
    fn park(&self, id: u64, dir: usize, waker: &Waker) {
        let mut shared = self.lock();
        let slot = &mut shared.waiting.entry(id).or_default()[dir];
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    fn forget(&self, id: u64) {
        self.lock().waiting.remove(&id);
    }
}

/// A connection behind an optional gate.
#[derive(Debug)]
pub struct Gated<T> {
    io: T,
    gate: Option<(Gate, u64)>,
}

impl<T> Gated<T> {
    /// A connection with no gate: every call goes straight through.
    pub fn ungated(io: T) -> Self {
        Gated { io, gate: None }
    }

    /// Wraps `io` in `gate` if there is one.
    pub fn new(io: T, gate: Option<&Gate>) -> Self {
        match gate {
            Some(g) => g.wrap(io),
            None => Gated::ungated(io),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T> Drop for Gated<T> {
    fn drop(&mut self) {
        if let Some((gate, id)) = &self.gate {
            gate.forget(*id);
        }
    }
}

const READ: usize = 0;
const WRITE: usize = 1;

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "connection cut (gate)")
}

impl<T: Unpin> Gated<T> {
    /// Runs `op` on the connection as the gate allows.
    fn through<R>(
        &mut self,
        cx: &mut Context<'_>,
        dir: usize,
        op: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        let Some((gate, id)) = &self.gate else {
            return op(Pin::new(&mut self.io), cx);
        };
        match gate.state() {
            GateState::Cut => return Poll::Ready(Err(reset())),
            GateState::Paused => {
                gate.park(*id, dir, cx.waker());
                // A change between the check and the park would be missed.
                if gate.state() == GateState::Paused {
                    return Poll::Pending;
                }
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            GateState::Open => {}
        }
        let polled = op(Pin::new(&mut self.io), cx);
        if polled.is_pending() {
            // Also woken by the gate, so a cut ends an idle connection.
            gate.park(*id, dir, cx.waker());
            if gate.state() != GateState::Open {
                cx.waker().wake_by_ref();
            }
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Gated<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut()
            .through(cx, READ, |io, cx| io.poll_read(cx, buf))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gated<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .through(cx, WRITE, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .through(cx, WRITE, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A paused connection does not close either (a frozen process
        // closes nothing); a cut one is gone already.
        self.get_mut()
            .through(cx, WRITE, |io, cx| io.poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .through(cx, WRITE, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Gated<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn pause_holds_bytes_and_open_lets_them_through() {
        let gate = Gate::new();
        let (a, b) = tokio::io::duplex(64);
        let mut a = gate.wrap(a);
        let mut b = Gated::ungated(b);
        gate.pause();
        let mut buf = [0u8; 2];
        let read = tokio::spawn(async move { a.read_exact(&mut buf).await.map(|_| buf) });
        b.write_all(b"hi").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!read.is_finished(), "read through a paused gate");
        gate.open();
        let got = tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"hi");
    }

    #[tokio::test]
    async fn cut_fails_a_waiting_read_at_once() {
        let gate = Gate::new();
        let (a, _b) = tokio::io::duplex(64);
        let mut a = gate.wrap(a);
        let read = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            a.read(&mut buf).await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.cut();
        let err = tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
