//! Endpoint grouping: `/users/42/orders/9f86d081884c7d65` and
//! `/users/7/orders/1a2b3c4d5e6f7a8b` are one endpoint,
//! `/users/{id}/orders/{id}`. Numeric, UUID, long hex and random-looking
//! segments become `{id}`.

/// Path templates kept per route before new ones go to the overflow bucket.
pub const MAX_ENDPOINTS: usize = 100;
/// The bucket for templates beyond `MAX_ENDPOINTS`.
pub const OVERFLOW: &str = "{other}";

pub fn template(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    template_into(path, &mut out);
    out
}

/// [`template`], appended to `out`.
pub fn template_into(path: &str, out: &mut String) {
    let path = path.split('?').next().unwrap_or("");
    let start = out.len();
    for (index, segment) in path.split('/').enumerate() {
        if index > 0 {
            out.push('/');
        }
        if is_id(segment) {
            out.push_str("{id}");
        } else {
            out.push_str(segment);
        }
    }
    if out.len() == start {
        out.push('/');
    }
}

fn is_id(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    let bytes = segment.as_bytes();
    let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
    if digits == bytes.len() {
        return true;
    }
    if is_uuid(segment) {
        return true;
    }
    let hex = bytes.iter().all(u8::is_ascii_hexdigit);
    if hex && bytes.len() >= 8 && digits > 0 {
        return true;
    }
    // Long tokens mixing letters and digits (base64/base62 ids, hashes).
    bytes.len() >= 16
        && digits > 0
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'='))
}

pub fn is_uuid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_placeholders() {
        assert_eq!(
            template("/users/42/orders/9f86d081884c7d65"),
            "/users/{id}/orders/{id}"
        );
        assert_eq!(
            template("/items/3fa85f64-5717-4562-b3fc-2c963f66afa6?x=1"),
            "/items/{id}"
        );
        assert_eq!(template("/tokens/aGVsbG8gd29ybGQ9MTIz"), "/tokens/{id}");
        assert_eq!(template("/json"), "/json");
        assert_eq!(template("/status/404"), "/status/{id}");
        assert_eq!(template("/"), "/");
        assert_eq!(template(""), "/");
        // Words, even hex-looking ones, stay.
        assert_eq!(
            template("/cafe/beefcake/deadbeef"),
            "/cafe/beefcake/deadbeef"
        );
        assert_eq!(template("/api/v2/health"), "/api/v2/health");
    }

    #[test]
    fn template_into_appends() {
        let mut key = String::from("GET ");
        template_into("/users/42?x=1", &mut key);
        assert_eq!(key, "GET /users/{id}");
        let mut key = String::from("GET ");
        template_into("?x=1", &mut key);
        assert_eq!(key, "GET /");
    }
}
