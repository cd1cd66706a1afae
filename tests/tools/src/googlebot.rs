//! The seed's example handler, *googlebot*: it answers "African or
//! European?" to questions about swallows and something sensible to anything
//! else. Used by the quick start and runnable on its own
//! (`swallow-googlebot --addr 127.0.0.1:8088`).

use std::net::SocketAddr;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use tokio::sync::mpsc;

/// A POST googlebot received, for printing.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub fields: Vec<(String, String)>,
}

/// googlebot's answer to a message text.
pub fn answer(text: &str) -> String {
    let lower = text.to_lowercase();
    if lower.contains("swallow") {
        "African or European?".into()
    } else if lower.contains("quest") {
        "To seek the Holy Grail.".into()
    } else if lower.contains("name") {
        "It is Arthur, King of the Britons.".into()
    } else if lower.contains("colour") || lower.contains("color") {
        "Blue. No, yel— aaaaargh!".into()
    } else {
        let asked = text.split_once(':').map(|(_, q)| q.trim()).unwrap_or(text);
        format!("I don't know \"{asked}\", but I know about swallows. Ask me about them.")
    }
}

/// Serves googlebot on `addr`; every POST is also sent to `seen`.
pub async fn serve(addr: SocketAddr, seen: mpsc::UnboundedSender<Received>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().fallback(handle).with_state(seen);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(bound)
}

async fn handle(
    State(seen): State<mpsc::UnboundedSender<Received>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(&body)
        .ok()
        .or_else(|| {
            let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
            Some(
                v.as_object()?
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect(),
            )
        })
        .unwrap_or_default();
    let text = fields
        .iter()
        .find(|(k, _)| k == "text")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let reply = answer(text);
    let headers = headers
        .iter()
        .filter(|(k, _)| {
            k.as_str().starts_with("webhook-") || k.as_str() == "user-agent" || k.as_str() == "content-type"
        })
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect();
    let _ = seen.send(Received { headers, fields });
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "text": reply }).to_string(),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers() {
        assert_eq!(
            super::answer("googlebot: What is the air-speed velocity of an unladen swallow?"),
            "African or European?"
        );
        assert!(super::answer("googlebot: hi").contains("\"hi\""));
    }
}
