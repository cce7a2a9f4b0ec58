//! The CLI's side of the admin API: HTTP/1 over the daemon's unix socket.

use std::path::Path;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A connection to a running daemon.
#[derive(Debug)]
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    /// Connects if a daemon serves `socket`; `None` if none runs.
    pub async fn connect(socket: &Path) -> Option<Client> {
        let stream = tokio::net::UnixStream::connect(socket).await.ok()?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.ok()?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Some(Client { sender })
    }

    /// Sends one request.
    ///
    /// # Errors
    /// If the daemon went away.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Response<Incoming>, String> {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(format!("http://mycel{path}"))
            .header("host", "mycel")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        self.sender.send_request(req).await.map_err(|e| format!("daemon API: {e}"))
    }

    /// Sends a request and reads the whole answer.
    ///
    /// # Errors
    /// If the daemon went away or answered with an error status.
    pub async fn json(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, String> {
        let resp = self.call(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        if !status.is_success() {
            return Err(String::from_utf8_lossy(&bytes).trim().to_string());
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("daemon answered non-JSON: {e}"))
    }
}

/// Reads the next NDJSON line from a streaming body into `buf`, returning it.
///
/// # Errors
/// If the stream breaks.
pub async fn next_line(body: &mut Incoming, buf: &mut Vec<u8>) -> Result<Option<Vec<u8>>, String> {
    loop {
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            return Ok(Some(line));
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                    if buf.len() > 1 << 20 {
                        return Err("daemon sent an over-long progress line".into());
                    }
                }
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => return Ok(None),
        }
    }
}
