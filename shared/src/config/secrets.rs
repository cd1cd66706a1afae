//! Secrets kept out of the file: `token_file`, `signing_secret_file`,
//! `slack_token_file` name files read at load (and again at every reload
//! check whose hash differs), relative to the configuration's directory.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::content_hash;
use super::errors::FieldError;

/// Reads the secret files a configuration names, relative to its
/// directory, and notes each one it read with a hash of its content.
pub(super) struct SecretFiles {
    base_dir: PathBuf,
    read: RefCell<Vec<(PathBuf, u64)>>,
}

impl SecretFiles {
    pub(super) fn new(base_dir: PathBuf) -> Self {
        SecretFiles {
            base_dir,
            read: Default::default(),
        }
    }

    pub(super) fn path(&self, file: &Path) -> PathBuf {
        self.base_dir.join(file)
    }

    /// Every file read, with a hash of its content.
    pub(super) fn into_read(self) -> Vec<(PathBuf, u64)> {
        self.read.into_inner()
    }

    /// The secret `name`: given `inline`, or read from `file` now (a
    /// trailing newline trimmed); `None` when neither is set. On error, the
    /// field at fault (`<name>_file`) and why, the path included.
    pub(super) fn secret(
        &self,
        inline: Option<String>,
        file: Option<&Path>,
        name: &str,
    ) -> Result<Option<String>, FieldError> {
        let Some(file) = file else { return Ok(inline) };
        let field = format!("{name}_file");
        if inline.is_some() {
            return Err((field, format!("give {name} or {name}_file, not both")));
        }
        let path = self.path(file);
        let bytes = std::fs::read(&path).map_err(|e| (field.clone(), format!("reading {}: {e}", path.display())))?;
        let hash = content_hash(&bytes);
        let text = String::from_utf8(bytes).map_err(|_| (field.clone(), format!("{} is not UTF-8", path.display())))?;
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        if text.trim().is_empty() {
            return Err((field, format!("{} is empty", path.display())));
        }
        self.read.borrow_mut().push((path, hash));
        Ok(Some(text.to_owned()))
    }

    /// A list of secrets, one per non-empty line of `file`, each checked by
    /// `parse`; `name` is the field (`signing_secret`) whose `_file` it is.
    pub(super) fn secret_lines<T>(
        &self,
        inline_too: bool,
        file: &Path,
        name: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Vec<T>, FieldError> {
        // Given inline too, `secret` refuses the pair.
        let text = self
            .secret(inline_too.then(String::new), Some(file), name)?
            .unwrap_or_default();
        let field = format!("{name}_file");
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(i, line)| {
                parse(line).map_err(|m| {
                    (
                        field.clone(),
                        format!("{}: secret {}: {m}", self.path(file).display(), i + 1),
                    )
                })
            })
            .collect()
    }
}

/// Decodes one `whsec_…` secret into its key.
pub(super) fn signing_key(secret: &str) -> Result<Vec<u8>, String> {
    let Some(b64) = secret.trim().strip_prefix("whsec_") else {
        return Err("must start with \"whsec_\"".into());
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("the part after \"whsec_\" is not base64: {e}"))?;
    if key.is_empty() {
        return Err("the key is empty".into());
    }
    Ok(key)
}
