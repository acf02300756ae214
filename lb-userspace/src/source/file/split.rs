//! The items of a JSON list found without parsing them: a byte scan that
//! follows strings (and their escapes) and bracket depth.
//!
//! A changed file is read again in full, but usually one item of its
//! 1,500 changed; `serde_json` would check every byte of the others only
//! to find where they end. The scan finds the boundaries; the caller still
//! parses every item whose text it has not seen (parsed) before, so the
//! file is valid JSON exactly when those items are. What the scan cannot
//! vouch for (anything but one object with `apiVersion`, `kind: …List` and
//! an `items` array of objects; escaped keys, duplicate keys, deep nesting)
//! it leaves to the validating path by returning `None`.

use serde::de::IgnoredAny;

/// Deeper than this, the scan gives up: `serde_json` refuses nesting
/// beyond 128, and a file it refuses must stay refused.
const MAX_DEPTH: usize = 100;

/// A list document, its items as they are written.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ListSplit<'a> {
    pub(super) api_version: String,
    pub(super) kind: String,
    /// Each item's text, from its `{` to its `}`; not checked.
    pub(super) items: Vec<&'a str>,
}

/// TEXT as one JSON object whose `kind` ends in `List`, with `apiVersion`
/// and an `items` array of objects: its items, not parsed. Every other
/// member is checked (`serde_json`), and so is the syntax between items;
/// the items are not. `None` for anything else.
pub(super) fn split_list(text: &str) -> Option<ListSplit<'_>> {
    let mut scan = Scanner { text, at: 0 };
    scan.skip_ws();
    scan.eat(b'{')?;
    let (mut api_version, mut kind, mut items) = (None, None, None);
    loop {
        scan.skip_ws();
        let key = scan.string()?;
        let key = key.get(1..key.len() - 1)?;
        // An escaped key would have to be unescaped to be compared.
        if key.bytes().any(|byte| byte == b'\\' || byte < 0x20) {
            return None;
        }
        scan.skip_ws();
        scan.eat(b':')?;
        scan.skip_ws();
        match key {
            "items" if items.is_none() => items = Some(scan.items()?),
            "apiVersion" if api_version.is_none() => {
                api_version = Some(serde_json::from_str::<String>(scan.value()?).ok()?);
            }
            "kind" if kind.is_none() => {
                kind = Some(serde_json::from_str::<String>(scan.value()?).ok()?);
            }
            // serde rejects a duplicate field of its struct.
            "items" | "apiVersion" | "kind" => return None,
            _ => {
                serde_json::from_str::<IgnoredAny>(scan.value()?).ok()?;
            }
        }
        scan.skip_ws();
        match scan.next()? {
            b',' => {}
            b'}' => break,
            _ => return None,
        }
    }
    scan.skip_ws();
    if scan.at != text.len() {
        return None;
    }
    let kind: String = kind?;
    if !kind.ends_with("List") {
        return None;
    }
    Some(ListSplit {
        api_version: api_version?,
        kind,
        items: items?,
    })
}

/// Bytes that matter outside strings: quotes and brackets.
const STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'}' as usize] = true;
    table[b'[' as usize] = true;
    table[b']' as usize] = true;
    table
};

/// Where the string whose body starts at AT ends (after its closing quote).
fn string_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let rest = bytes.get(at..)?;
        // Most strings of a manifest are short: a plain loop finds their
        // end sooner than setting up a vector search.
        let found = match rest.iter().take(16).position(|&b| b == b'"' || b == b'\\') {
            Some(found) => found,
            None => memchr::memchr2(b'"', b'\\', rest)?,
        };
        at += found;
        if bytes[at] == b'"' {
            return Some(at + 1);
        }
        // An escape: the byte after the backslash is never the end
        // (`\u` digits are neither a quote nor a backslash).
        at += 2;
    }
}

/// Where the object or array whose body starts at AT ends (after its
/// closing bracket); `None` past [`MAX_DEPTH`].
fn container_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    let mut depth = 1usize;
    loop {
        while !STRUCTURAL[usize::from(*bytes.get(at)?)] {
            at += 1;
        }
        match bytes[at] {
            b'"' => at = string_end(bytes, at + 1)?,
            b'{' | b'[' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return None;
                }
                at += 1;
            }
            _ => {
                depth -= 1;
                at += 1;
                if depth == 0 {
                    return Some(at);
                }
            }
        }
    }
}

struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let byte = self.peek()?;
        self.at += 1;
        Some(byte)
    }

    fn eat(&mut self, expected: u8) -> Option<()> {
        (self.next()? == expected).then_some(())
    }

    /// JSON's whitespace, no more.
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// From after an opening `"` to after its closing one.
    fn skip_string_body(&mut self) -> Option<()> {
        self.at = string_end(self.bytes(), self.at)?;
        Some(())
    }

    /// A string, quotes included.
    fn string(&mut self) -> Option<&'a str> {
        let start = self.at;
        self.eat(b'"')?;
        self.skip_string_body()?;
        self.text.get(start..self.at)
    }

    /// One value's text: an object or array to its matching bracket, a
    /// string, or a bare word (number, `true` ...) up to a delimiter.
    fn value(&mut self) -> Option<&'a str> {
        let start = self.at;
        match self.peek()? {
            b'{' | b'[' => self.at = container_end(self.bytes(), self.at + 1)?,
            b'"' => {
                self.string()?;
            }
            _ => {
                while let Some(byte) = self.peek() {
                    if matches!(byte, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.at += 1;
                }
            }
        }
        (self.at > start).then(|| self.text.get(start..self.at))?
    }

    /// An array of objects: each object's text.
    fn items(&mut self) -> Option<Vec<&'a str>> {
        self.eat(b'[')?;
        self.skip_ws();
        let mut items = Vec::new();
        if self.peek()? == b']' {
            self.at += 1;
            return Some(items);
        }
        loop {
            if self.peek()? != b'{' {
                return None;
            }
            items.push(self.value()?);
            self.skip_ws();
            match self.next()? {
                b',' => self.skip_ws(),
                b']' => return Some(items),
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::value::RawValue;

    use super::*;

    /// What the validating path makes of TEXT: the list head and items
    /// as `serde_json` finds them, `None` when it does not see a list.
    fn by_serde(text: &str) -> Option<ListSplit<'_>> {
        #[derive(Deserialize)]
        struct Head<'a> {
            #[serde(rename = "apiVersion")]
            api_version: Option<String>,
            kind: Option<String>,
            #[serde(borrow)]
            items: Option<Vec<&'a RawValue>>,
        }
        let head: Head<'_> = serde_json::from_str(text).ok()?;
        let kind = head.kind?;
        if !kind.ends_with("List") {
            return None;
        }
        Some(ListSplit {
            api_version: head.api_version?,
            kind,
            items: head.items?.into_iter().map(RawValue::get).collect(),
        })
    }

    /// The scan agrees with `serde_json` on TEXT: where it splits, serde
    /// finds the same list when all items are valid, and refuses the text
    /// only because an item is invalid (then true).
    fn agrees(text: &str) -> bool {
        let split = split_list(text);
        let serde = by_serde(text);
        match (&split, &serde) {
            (Some(split), Some(serde)) => assert_eq!(split, serde, "{text}"),
            (Some(split), None) => {
                assert!(
                    split
                        .items
                        .iter()
                        .any(|item| serde_json::from_str::<IgnoredAny>(item).is_err()),
                    "split, but serde refuses it with valid items: {text}"
                );
                return true;
            }
            // The validating path takes what the scan leaves.
            (None, _) => {}
        }
        false
    }

    const SERVICE: &str = r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"a [b] {c}","namespace":"ns","annotations":{"x":"say \"}\" or \\","y":"\u007d]"}},"spec":{"ports":[{"port":80}],"clusterIPs":["10.0.0.1"]}}"#;

    #[test]
    fn splits_items_with_brackets_and_escapes_in_strings() {
        let text = format!(
            "\n {{ \"kind\" : \"List\",\"metadata\":{{\"resourceVersion\":\"\"}},\t\"apiVersion\":\"v1\",\r\n\"items\" : [ {SERVICE} ,\n{{\"a\":[[1,[2]],{{}}],\"b\":null}}] }}\n"
        );
        let split = split_list(&text).expect("a list");
        assert_eq!(split.api_version, "v1");
        assert_eq!(split.kind, "List");
        assert_eq!(split.items, [SERVICE, r#"{"a":[[1,[2]],{}],"b":null}"#]);
        agrees(&text);
        let empty = r#"{"apiVersion":"v1","kind":"ServiceList","items":[ ]}"#;
        assert_eq!(split_list(empty).expect("a list").items.len(), 0);
        agrees(empty);
    }

    #[test]
    fn leaves_what_it_cannot_vouch_for_to_the_validating_path() {
        let list =
            |items: &str| format!(r#"{{"apiVersion":"v1","kind":"List","items":[{items}]}}"#);
        for text in [
            // Not lists, or not as the fast path reads them.
            r#"{"apiVersion":"v1","kind":"Service","items":[]}"#.to_owned(),
            r#"{"kind":"List","items":[]}"#.to_owned(),
            r#"{"apiVersion":"v1","kind":"List","items":null}"#.to_owned(),
            r#"{"apiVersion":null,"kind":"List","items":[]}"#.to_owned(),
            r#"{"apiVersion":"v1","kin\u0064":"List","items":[]}"#.to_owned(),
            r#"{"apiVersion":"v1","kind":"List","kind":"List","items":[]}"#.to_owned(),
            list("null"),
            list("1,{}"),
            // Broken around the items: serde refuses the file.
            list("{},"),
            list("{} {}"),
            list("{}}"),
            format!("{},", list("{}")),
            format!("{} {}", list("{}"), list("{}")),
            r#"{"apiVersion":"v1","kind":"List","metadata":{"a":tru},"items":[]}"#.to_owned(),
            r#"{"apiVersion":"v1","kind":"List","metadata":{"a":1,},"items":[]}"#.to_owned(),
            r#"{"apiVersion":"v1","kind":"List","items":[],}"#.to_owned(),
            "\u{feff}{\"apiVersion\":\"v1\",\"kind\":\"List\",\"items\":[]}".to_owned(),
            // Deeper than serde goes.
            list(&format!(
                "{{\"a\":{}1{}}}",
                "[".repeat(200),
                "]".repeat(200)
            )),
        ] {
            assert_eq!(split_list(&text), None, "{text}");
            agrees(&text);
        }
    }

    #[test]
    fn truncated_lists_are_never_split() {
        let text = format!(r#"{{"apiVersion":"v1","kind":"List","items":[{SERVICE},{SERVICE}]}}"#);
        assert!(split_list(&text).is_some());
        for end in 0..text.len() {
            assert_eq!(split_list(&text[..end]), None, "{}", &text[..end]);
        }
    }

    /// A small deterministic generator (xorshift), so that the cases are
    /// the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            usize::try_from(self.next() % n as u64).expect("small")
        }
    }

    /// A random JSON value with the awkward parts: strings holding
    /// brackets, quotes, backslashes and escapes; nesting; whitespace.
    fn value(rng: &mut Rng, depth: usize) -> String {
        const PIECES: [&str; 12] = [
            "a", "{", "}", "[", "]", "\\\"", "\\\\", ",", ":", "\\u005d", " ", "é",
        ];
        let ws = |rng: &mut Rng| [" ", "", "\n", "\t", "", "\r\n"][rng.below(6)].to_owned();
        match rng.below(if depth > 3 { 3 } else { 5 }) {
            0 => ["1", "-2.5e3", "true", "false", "null"][rng.below(5)].to_owned(),
            1 | 2 => {
                let pieces: String = (0..rng.below(6))
                    .map(|_| PIECES[rng.below(PIECES.len())])
                    .collect();
                format!("\"{pieces}\"")
            }
            3 => {
                let items: Vec<String> = (0..rng.below(4))
                    .map(|_| format!("{}{}{}", ws(rng), value(rng, depth + 1), ws(rng)))
                    .collect();
                format!("[{}]", items.join(","))
            }
            _ => object(rng, depth + 1),
        }
    }

    fn object(rng: &mut Rng, depth: usize) -> String {
        let members: Vec<String> = (0..rng.below(4))
            .map(|k| {
                format!(
                    "\"k{k}{}\" : {}",
                    ["", "}", "]\\\""][rng.below(3)],
                    value(rng, depth)
                )
            })
            .collect();
        format!("{{{}}}", members.join(","))
    }

    /// Random lists, valid and then damaged (a byte removed, replaced or
    /// inserted, or cut short): wherever the scan splits, `serde_json`
    /// finds the same items, or refuses the file because of an item.
    #[test]
    fn agrees_with_serde_on_random_and_damaged_lists() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let (mut split, mut bad_item) = (0, 0);
        for _ in 0..3000 {
            let items: Vec<String> = (0..rng.below(5)).map(|_| object(&mut rng, 0)).collect();
            let text = format!(
                r#"{{"metadata":{},"apiVersion":"v1", "kind":"List","items":[{}]}}"#,
                value(&mut rng, 2),
                items.join(" , ")
            );
            assert!(split_list(&text).is_some(), "{text}");
            assert!(!agrees(&text));
            split += 1;
            let mut bytes = text.clone().into_bytes();
            let at = rng.below(bytes.len());
            let noise = b"{}[]\"\\,: x"[rng.below(10)];
            match rng.below(4) {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes[at] = noise,
                2 => bytes.insert(at, noise),
                _ => bytes.truncate(at),
            }
            if let Ok(damaged) = String::from_utf8(bytes)
                && agrees(&damaged)
            {
                bad_item += 1;
            }
        }
        assert_eq!(split, 3000);
        // Damage inside an item is common: the case that matters is seen.
        assert!(bad_item > 100, "{bad_item}");
    }
}
