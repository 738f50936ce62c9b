//! A real browser for the dashboard test: headless Debian `chromium`
//! (scripts/test.sh installs it), driven over the Chrome DevTools Protocol
//! on one websocket (`tungstenite`). Chromium runs in its own process group
//! with a profile of its own; dropping the `Browser` kills the group and
//! whatever else runs with that profile, also when the test fails.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

use crate::{Proc, cmdline};

/// How long one DevTools call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Browser {
    ws: WebSocket<TcpStream>,
    next_id: u64,
    /// The page's DevTools session (flat mode: one socket for all).
    session: String,
    profile: PathBuf,
    proc: Proc,
}

impl Browser {
    /// Starts headless chromium with its profile and log under `dir`, and
    /// opens one blank page.
    pub fn start(dir: &Path) -> Browser {
        let profile = dir.join("chromium-profile");
        std::fs::create_dir_all(&profile).expect("profile dir");
        let mut cmd = std::process::Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--remote-debugging-port=0",
            "--window-size=1400,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank");
        let proc = Proc::spawn("chromium", &mut cmd, &dir.join("chromium.log"));
        let start = Instant::now();
        // It prints "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID".
        let url = loop {
            let log = proc.log_text();
            if let Some(url) = log
                .lines()
                .find_map(|l| l.split("DevTools listening on ").nth(1))
            {
                break url.trim().to_string();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromium did not start (is Debian's chromium installed? scripts/test.sh does it):\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let host = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("devtools host")
            .to_string();
        let tcp = TcpStream::connect(&host).expect("connecting to DevTools");
        tcp.set_read_timeout(Some(CALL_TIMEOUT)).expect("timeout");
        let (ws, _) = tungstenite::client(url.as_str(), tcp).expect("DevTools handshake");
        let mut b = Browser {
            ws,
            next_id: 0,
            session: String::new(),
            profile,
            proc,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        b.call("Page.enable", json!({}));
        b
    }

    /// One DevTools call (on the page's session once there is one); its
    /// result. Events that arrive meanwhile are skipped.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            assert!(Instant::now() < deadline, "DevTools {method}: no answer");
            let m = self
                .ws
                .read()
                .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if v["id"].as_u64() == Some(id) {
                assert!(v.get("error").is_none(), "DevTools {method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Goes to `url` (a page load, as a person typing it).
    pub fn navigate(&mut self, url: &str) {
        let r = self.call("Page.navigate", json!({"url": url}));
        assert!(r.get("errorText").is_none(), "navigate {url}: {r}");
    }

    /// The value of a JavaScript expression in the page.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }

    /// The page's visible text.
    pub fn text(&mut self) -> String {
        self.eval("document.body ? document.body.innerText : ''")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Polls the page's text every 200 ms until `ok` holds, or panics
    /// after `deadline` showing the last text.
    pub fn wait_text(
        &mut self,
        what: &str,
        deadline: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let start = Instant::now();
        loop {
            let text = self.text();
            if ok(&text) {
                return text;
            }
            assert!(
                start.elapsed() < deadline,
                "timed out after {deadline:?} waiting for {what}; the page shows:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Saves a PNG screenshot of the page at `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let data = base64_decode(r["data"].as_str().expect("screenshot data"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("screenshot dir");
        }
        std::fs::write(path, data).expect("writing the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.ws.close(None);
        self.proc.kill();
        // Helpers chromium may have moved out of its process group: every
        // process running with this test's own profile dir.
        let profile = format!("--user-data-dir={}", self.profile.display());
        let pids: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| cmdline(*pid).contains(&profile))
            .collect();
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Standard base64 (what DevTools sends screenshots in).
fn base64_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(value) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes() {
        assert_eq!(super::base64_decode("aGVsbG8="), b"hello");
        assert_eq!(super::base64_decode("iVBORw=="), [0x89, b'P', b'N', b'G']);
    }
}
