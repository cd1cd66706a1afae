//! What the queued-message tests share: a fixture's bytes, and the message
//! it decodes to, checked to encode back byte for byte.

/// The bytes of `fixtures/<version>/<name>`.
pub fn fixture(version: &str, name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{version}/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// The fixture decoded, after checking that it encodes back to the same bytes.
#[allow(dead_code, reason = "not every test file decodes this way")]
pub fn same_again<T: serde::Serialize + serde::de::DeserializeOwned>(version: &str, name: &str) -> T {
    let bytes = fixture(version, name);
    let value: T = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("decoding {name}: {e}"));
    let again = serde_json::to_vec(&value).expect("it serializes");
    assert_eq!(
        String::from_utf8_lossy(&again),
        String::from_utf8_lossy(&bytes),
        "{name}: re-serialized differently"
    );
    value
}
