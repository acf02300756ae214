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

/// Items that may differ from the last read before a file is scanned
/// whole instead (an insertion shifts every item after it).
const MAX_RELOCATED_CHANGES: usize = 16;

/// Where a list's items sat in a file's text, with their hashes: enough
/// to find them again in the file's next text without scanning the ones
/// that did not change (most of them, when one endpoint changed).
#[derive(Debug)]
pub(super) struct ListLayout {
    pub(super) api_version: String,
    pub(super) kind: String,
    /// Length and hash of the text before the first item.
    head: (usize, u64),
    /// Length and hash of the text after the last item.
    tail: (usize, u64),
    /// Each item's start, length and hash (as the caller hashes items).
    items: Vec<(u32, u32, u64)>,
}

impl ListLayout {
    /// The layout of LIST in TEXT, its items hashed as HASHES; `None` for
    /// an empty list (nothing to save) or a file beyond 4 GiB.
    pub(super) fn of(text: &str, list: &ListSplit<'_>, hashes: &[u64]) -> Option<Self> {
        let offset = |item: &str| item.as_ptr().addr() - text.as_ptr().addr();
        let start = offset(list.items.first()?);
        let final_item = list.items.last()?;
        let end = offset(final_item) + final_item.len();
        let items = list
            .items
            .iter()
            .zip(hashes)
            .map(|(item, hash)| {
                Some((
                    u32::try_from(offset(item)).ok()?,
                    u32::try_from(item.len()).ok()?,
                    *hash,
                ))
            })
            .collect::<Option<_>>()?;
        Some(Self {
            api_version: list.api_version.clone(),
            kind: list.kind.clone(),
            head: (start, text_hash(&[text.get(..start)?.as_bytes()])),
            tail: (text.len() - end, text_hash(&[text.get(end..)?.as_bytes()])),
            items,
        })
    }

    /// The list in TEXT, if TEXT is this layout's with some items changed
    /// in place (same head and tail, as many items): each item's text and
    /// hash (`item_hash`), an unchanged item found without a scan. Like
    /// [`split_list`], the changed items are not checked. `None` for
    /// anything else (the caller scans).
    pub(super) fn relocate<'a>(
        &self,
        text: &'a str,
        item_hash: impl Fn(&str) -> u64,
    ) -> Option<(ListSplit<'a>, Vec<u64>)> {
        let bytes = text.as_bytes();
        let (head, head_hash) = self.head;
        if text_hash(&[bytes.get(..head)?]) != head_hash {
            return None;
        }
        let mut at = head;
        let mut items = Vec::with_capacity(self.items.len());
        let mut hashes = Vec::with_capacity(self.items.len());
        let mut changed = 0;
        for (index, &(_, len, hash)) in self.items.iter().enumerate() {
            if index > 0 {
                at = skip_ws(bytes, at);
                if bytes.get(at) != Some(&b',') {
                    return None;
                }
                at = skip_ws(bytes, at + 1);
            }
            if bytes.get(at) != Some(&b'{') {
                return None;
            }
            let same = at + usize::try_from(len).ok()?;
            let (end, hash) = match text.get(at..same) {
                Some(item) if item_hash(item) == hash => (same, hash),
                _ => {
                    changed += 1;
                    if changed > MAX_RELOCATED_CHANGES {
                        return None;
                    }
                    let end = container_end(bytes, at + 1)?;
                    (end, item_hash(text.get(at..end)?))
                }
            };
            items.push(text.get(at..end)?);
            hashes.push(hash);
            at = end;
        }
        let (tail, tail_hash) = self.tail;
        let rest = bytes.get(at..)?;
        if rest.len() != tail || text_hash(&[rest]) != tail_hash {
            return None;
        }
        let list = ListSplit {
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            items,
        };
        Some((list, hashes))
    }
}

/// A fast 64-bit hash of `parts` (eight bytes per step), to tell whether an
/// object's text changed: every object of a changed file is hashed, so
/// `SipHash` would cost more than the rest of reading the file. Not meant to
/// resist crafted collisions: whoever writes the directory controls the
/// objects anyway.
pub(super) fn text_hash(parts: &[&[u8]]) -> u64 {
    const MULTIPLIER: u64 = 0x9e37_79b9_7f4a_7c15;
    let mix = |hash: u64, word: u64| (hash ^ word).wrapping_mul(MULTIPLIER).rotate_left(29);
    let mut hash: u64 = 0x243f_6a88_85a3_08d3;
    for part in parts {
        let (words, rest) = part.as_chunks::<8>();
        for word in words {
            hash = mix(hash, u64::from_le_bytes(*word));
        }
        for &byte in rest {
            hash = mix(hash, u64::from(byte));
        }
        hash = mix(hash, part.len() as u64);
    }
    hash ^ (hash >> 32)
}

/// After JSON whitespace from AT.
fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = bytes.get(at) {
        at += 1;
    }
    at
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
        self.at = skip_ws(self.bytes(), self.at);
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

    fn hash(item: &str) -> u64 {
        text_hash(&[item.as_bytes()])
    }

    fn layout_of(text: &str) -> ListLayout {
        let list = split_list(text).expect("a list");
        let hashes: Vec<u64> = list.items.iter().map(|item| hash(item)).collect();
        ListLayout::of(text, &list, &hashes).expect("a layout")
    }

    /// What a relocation found is what a scan finds, or a changed item
    /// (which the caller parses) is not JSON. True when it found a list.
    fn relocation_agrees(layout: &ListLayout, text: &str) -> bool {
        let Some((list, hashes)) = layout.relocate(text, hash) else {
            return false;
        };
        let fresh: Vec<u64> = list.items.iter().map(|item| hash(item)).collect();
        assert_eq!(hashes, fresh, "{text}");
        match split_list(text) {
            Some(split) => assert_eq!(list, split, "{text}"),
            None => assert!(
                list.items
                    .iter()
                    .any(|item| serde_json::from_str::<IgnoredAny>(item).is_err()),
                "relocated, but the scan refuses it with valid items: {text}"
            ),
        }
        true
    }

    #[test]
    fn a_changed_item_is_relocated_and_anything_else_is_scanned() {
        let list = |items: &[&str], gap: &str| {
            format!(
                r#"{{"apiVersion":"v1","items":[{}],"kind":"List"}}"#,
                items.join(&format!(",{gap}"))
            )
        };
        let (a, b, c) = (SERVICE, r#"{"a":"}"}"#, r#"{"b":[1,{"c":"\""}]}"#);
        let layout = layout_of(&list(&[a, b, c], ""));
        let longer = r#"{"a":"}}}}","more":[[]]}"#;
        for (what, text, relocated) in [
            ("unchanged", list(&[a, b, c], ""), true),
            ("one longer", list(&[a, longer, c], ""), true),
            ("two shorter", list(&["{}", b, "{}"], ""), true),
            ("spaced out", list(&[a, b, c], " \n"), true),
            ("one more", list(&[a, b, c, "{}"], ""), false),
            ("one fewer", list(&[a, c], ""), false),
            (
                "another head",
                list(&[a, b, c], "").replace("v1", "v2"),
                false,
            ),
            (
                "another tail",
                list(&[a, b, c], "").replace("List", "ServiceList"),
                false,
            ),
            ("garbage after", list(&[a, b, c], "") + "x", false),
            ("not an object", list(&[a, "[]", c], ""), false),
        ] {
            assert_eq!(relocation_agrees(&layout, &text), relocated, "{what}");
        }
    }

    /// Random lists with items replaced (by valid or damaged ones),
    /// added, removed or spaced out: a relocation always agrees with the
    /// scan, and finds the list when items were only replaced.
    #[test]
    fn relocation_agrees_with_the_scan_on_random_edits() {
        let mut rng = Rng(0x5eed_1234_abcd_0002);
        let mut relocated = 0;
        for _ in 0..2000 {
            let mut items: Vec<String> = (0..=rng.below(6)).map(|_| object(&mut rng, 0)).collect();
            let text = format!(
                r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
                items.join(",")
            );
            let layout = layout_of(&text);
            let edit = rng.below(5);
            match edit {
                0 | 1 => {
                    let at = rng.below(items.len());
                    items[at] = object(&mut rng, 0);
                }
                2 => {
                    let at = rng.below(items.len());
                    let mut damaged = items[at].clone().into_bytes();
                    let byte = rng.below(damaged.len());
                    damaged[byte] = b"{}[]\"\\, x"[rng.below(9)];
                    items[at] = String::from_utf8(damaged).unwrap_or_else(|_| "{}".into());
                }
                3 => {
                    let at = rng.below(items.len());
                    items.remove(at);
                }
                _ => items.push(object(&mut rng, 0)),
            }
            let gap = if rng.below(4) == 0 { " , " } else { "," };
            let text = format!(
                r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
                items.join(gap)
            );
            let found = relocation_agrees(&layout, &text);
            if edit < 2 && !items.is_empty() {
                assert!(found, "an item replaced: {text}");
                relocated += 1;
            }
        }
        assert!(relocated > 500, "{relocated}");
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
