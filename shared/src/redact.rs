//! URLs as they may be shown: in logs, errors, metrics labels and delivery
//! log records. One rule for every URL swallow shows, broker or handler: a
//! password becomes `***`, and the query and fragment (where a handler's
//! key often travels) are left out. Text that does not parse as a URL is
//! hidden from its `://` to its last `@`, and cut at its first `?`.

/// `text` (one URL) without its secrets.
pub fn url(text: &str) -> String {
    let text = text.trim();
    match url::Url::parse(text) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => {
            let text = text.split(['?', '#']).next().unwrap_or_default();
            match (text.find("://"), text.rfind('@')) {
                (Some(start), Some(at)) if at > start => format!("{}***{}", &text[..start + 3], &text[at..]),
                _ => text.to_owned(),
            }
        }
    }
}

/// A comma-separated list of URLs (a cluster's broker addresses), each
/// without its secrets.
pub fn urls(list: &str) -> String {
    let shown: Vec<String> = list.split(',').map(url).collect();
    shown.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_queries_and_fragments_are_left_out() {
        assert_eq!(
            urls("amqp://a:secret1@h1:5672/%2f,amqps://b:secret2@h2:5671/%2f?frame_max=8192"),
            "amqp://a:***@h1:5672/%2f,amqps://b:***@h2:5671/%2f"
        );
        assert_eq!(
            url("https://bot:s3cret@hooks.example.com/bot?key=s3cret#x"),
            "https://bot:***@hooks.example.com/bot"
        );
        assert_eq!(
            url("http://127.0.0.1:8088/googlebot"),
            "http://127.0.0.1:8088/googlebot"
        );
        assert_eq!(url("amqp://localhost"), "amqp://localhost");
    }

    #[test]
    fn text_that_is_not_a_url_keeps_no_secret() {
        assert_eq!(url("amqp://u:p@ss@[bad"), "amqp://***@[bad");
        assert_eq!(url("not a url?key=s3cret"), "not a url");
    }
}
