//! `docs/api.md` against the proto files, so the API reference cannot go
//! out of date unnoticed:
//!
//! - every service, method, message, field (with its type, in proto order)
//!   and enum value (with its number) of `proto/edge/v1/*.proto` has its
//!   place in docs/api.md, and docs/api.md names none that does not exist;
//! - every service, method, message and enum carries a comment in the
//!   proto (what `grpcurl describe` shows, and what docs/api.md follows);
//! - the project's Markdown never links outside the repository (or to a
//!   file or heading that does not exist).
//!
//! The proto parser is deliberately simple (line-based); it is itself
//! checked against the compiled descriptor set, so it cannot miss an item.
//! No processes are started: these are plain unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- the proto files ----

/// A method: name, input and output message (without `stream`).
type Rpc = (String, String, String);

/// What the proto files declare, in declaration order.
#[derive(Debug, Default, PartialEq)]
struct Api {
    /// Service -> its methods.
    services: BTreeMap<String, Vec<Rpc>>,
    /// Message -> (field, type as written: `repeated Node`, `map<string, string>`).
    messages: BTreeMap<String, Vec<(String, String)>>,
    /// Enum -> (value, number).
    enums: BTreeMap<String, Vec<(String, i32)>>,
}

/// The declarations (service, rpc, message, enum) without a comment right
/// above them, as `file:line: declaration`.
type Uncommented = Vec<String>;

enum Block {
    Service(String),
    Message(String),
    Enum(String),
    Oneof,
}

/// `rpc Name(stream In) returns (stream Out);` -> (Name, In, Out).
fn parse_rpc(decl: &str) -> Option<Rpc> {
    let rest = decl.strip_prefix("rpc ")?;
    let (name, rest) = rest.split_once('(')?;
    let (input, rest) = rest.split_once(')')?;
    let output = rest.split_once('(')?.1.split_once(')')?.0;
    let plain = |t: &str| t.trim().trim_start_matches("stream ").trim().to_string();
    Some((name.trim().to_string(), plain(input), plain(output)))
}

/// Parses one proto file into `api`, line by line.
fn parse_proto(file: &str, text: &str, api: &mut Api, uncommented: &mut Uncommented) {
    let mut stack: Vec<Block> = Vec::new();
    let mut commented = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with("//") {
            commented = true;
            continue;
        }
        let code = line.split("//").next().unwrap_or_default().trim();
        let had_comment = std::mem::replace(&mut commented, false);
        if code.is_empty() {
            continue;
        }
        let declared = |kind: &str| code.strip_prefix(kind).map(|r| r.trim_end_matches('{'));
        let mut note = |what: &str| {
            if !had_comment {
                uncommented.push(format!("{file}:{}: {what}", i + 1));
            }
        };
        if code == "}" {
            stack
                .pop()
                .unwrap_or_else(|| panic!("{file}:{}: unbalanced }}", i + 1));
        } else if let Some(name) = declared("service ") {
            let name = name.trim().to_string();
            note(&format!("service {name}"));
            api.services.insert(name.clone(), Vec::new());
            stack.push(Block::Service(name));
        } else if code.starts_with("rpc ") {
            let rpc =
                parse_rpc(code).unwrap_or_else(|| panic!("{file}:{}: cannot read {code:?}", i + 1));
            note(&format!("rpc {}", rpc.0));
            match stack.last() {
                Some(Block::Service(s)) => api.services.get_mut(s).expect("service").push(rpc),
                _ => panic!("{file}:{}: rpc outside a service", i + 1),
            }
        } else if let Some(decl) = code.strip_prefix("message ") {
            let (name, empty) = match decl.strip_suffix("{}") {
                Some(n) => (n.trim().to_string(), true),
                None => (decl.trim_end_matches('{').trim().to_string(), false),
            };
            note(&format!("message {name}"));
            api.messages.insert(name.clone(), Vec::new());
            if !empty {
                stack.push(Block::Message(name));
            }
        } else if let Some(name) = declared("enum ") {
            let name = name.trim().to_string();
            note(&format!("enum {name}"));
            api.enums.insert(name.clone(), Vec::new());
            stack.push(Block::Enum(name));
        } else if code.starts_with("oneof ") {
            stack.push(Block::Oneof);
        } else if let Some((left, number)) = code.trim_end_matches(';').split_once(" = ")
            && !stack.is_empty()
        {
            let number: i32 = number
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{file}:{}: cannot read {code:?}", i + 1));
            let message = stack.iter().rev().find_map(|b| match b {
                Block::Message(m) => Some(m.clone()),
                _ => None,
            });
            match stack.last() {
                Some(Block::Enum(e)) => api
                    .enums
                    .get_mut(e)
                    .expect("enum")
                    .push((left.trim().to_string(), number)),
                Some(Block::Message(_) | Block::Oneof) => {
                    let (ty, name) = left
                        .trim()
                        .rsplit_once(' ')
                        .unwrap_or_else(|| panic!("{file}:{}: cannot read {code:?}", i + 1));
                    let message = message.expect("a field is inside a message");
                    api.messages
                        .get_mut(&message)
                        .expect("message")
                        .push((name.to_string(), ty.trim().to_string()));
                }
                _ => panic!("{file}:{}: unexpected {code:?}", i + 1),
            }
        }
    }
    assert!(stack.is_empty(), "{file}: a block is not closed");
}

/// Every proto file of `proto/edge/v1`, parsed.
fn proto_api() -> (Api, Uncommented) {
    let dir = repo().join("proto/edge/v1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "proto files missing in {}", dir.display());
    let mut api = Api::default();
    let mut uncommented = Vec::new();
    for f in &files {
        let name = format!("proto/edge/v1/{}", f.file_name().unwrap().to_string_lossy());
        parse_proto(&name, &read(f), &mut api, &mut uncommented);
    }
    (api, uncommented)
}

/// The same, from the descriptor set the build compiled (and reflection
/// serves).
fn descriptor_api() -> Api {
    let set = prost_types::FileDescriptorSet::decode(edgepool_common::proto::FILE_DESCRIPTOR_SET)
        .expect("descriptor set");
    let short = |t: &str| {
        let t = t.trim_start_matches('.');
        t.strip_prefix("edge.v1.").unwrap_or(t).to_string()
    };
    let mut api = Api::default();
    for file in set.file.iter().filter(|f| f.package() == "edge.v1") {
        for s in &file.service {
            let rpcs = s
                .method
                .iter()
                .map(|m| {
                    (
                        m.name().to_string(),
                        short(m.input_type()),
                        short(m.output_type()),
                    )
                })
                .collect();
            api.services.insert(s.name().to_string(), rpcs);
        }
        for e in &file.enum_type {
            let values = e
                .value
                .iter()
                .map(|v| (v.name().to_string(), v.number()))
                .collect();
            api.enums.insert(e.name().to_string(), values);
        }
        for m in &file.message_type {
            let scalar = |f: &prost_types::FieldDescriptorProto| match f.r#type() {
                Type::Message | Type::Enum | Type::Group => short(f.type_name()),
                Type::Double => "double".into(),
                Type::Float => "float".into(),
                Type::Int64 => "int64".into(),
                Type::Uint64 => "uint64".into(),
                Type::Int32 => "int32".into(),
                Type::Fixed64 => "fixed64".into(),
                Type::Fixed32 => "fixed32".into(),
                Type::Bool => "bool".into(),
                Type::String => "string".into(),
                Type::Bytes => "bytes".into(),
                Type::Uint32 => "uint32".into(),
                Type::Sfixed32 => "sfixed32".into(),
                Type::Sfixed64 => "sfixed64".into(),
                Type::Sint32 => "sint32".into(),
                Type::Sint64 => "sint64".into(),
            };
            let fields = m
                .field
                .iter()
                .map(|f| {
                    let map_entry = m.nested_type.iter().find(|n| {
                        n.options.as_ref().is_some_and(|o| o.map_entry())
                            && f.type_name().ends_with(&format!(".{}", n.name()))
                    });
                    let ty = if let Some(entry) = map_entry {
                        format!(
                            "map<{}, {}>",
                            scalar(&entry.field[0]),
                            scalar(&entry.field[1])
                        )
                    } else if f.label() == Label::Repeated {
                        format!("repeated {}", scalar(f))
                    } else if f.proto3_optional() {
                        format!("optional {}", scalar(f))
                    } else {
                        scalar(f)
                    };
                    (f.name().to_string(), ty)
                })
                .collect();
            api.messages.insert(m.name().to_string(), fields);
        }
    }
    api
}

// ---- docs/api.md ----

/// A Markdown heading and the lines under it, up to the next heading of
/// the same or a higher level.
#[derive(Debug)]
struct Section {
    level: usize,
    title: String,
    line: usize,
    body: Vec<String>,
}

fn heading(line: &str) -> Option<(usize, &str)> {
    let level = line.bytes().take_while(|&b| b == b'#').count();
    (level > 0 && line[level..].starts_with(' ')).then(|| (level, line[level..].trim()))
}

fn sections(markdown: &str) -> Vec<Section> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut out = Vec::new();
    let mut fenced = false;
    let mut starts = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && let Some((level, title)) = heading(line) {
            starts.push((i, level, title.to_string()));
        }
    }
    for (k, (i, level, title)) in starts.iter().enumerate() {
        let end = starts[k + 1..]
            .iter()
            .find(|(_, l, _)| l <= level)
            .map_or(lines.len(), |(j, _, _)| *j);
        out.push(Section {
            level: *level,
            title: title.clone(),
            line: i + 1,
            body: lines[i + 1..end].iter().map(|l| l.to_string()).collect(),
        });
    }
    out
}

/// The rows of a section's table whose first cell is a code span:
/// (`first`, second cell), code spans unwrapped.
fn rows(s: &Section) -> Vec<(String, String)> {
    s.body
        .iter()
        .filter_map(|l| {
            let cells: Vec<&str> = l
                .trim()
                .strip_prefix('|')?
                .split('|')
                .map(str::trim)
                .collect();
            let first = cells.first()?.strip_prefix('`')?.strip_suffix('`')?;
            let second = cells.get(1)?;
            let second = second
                .strip_prefix('`')
                .and_then(|c| c.strip_suffix('`'))
                .unwrap_or(second);
            Some((first.to_string(), second.to_string()))
        })
        .collect()
}

fn code(title: &str) -> Option<&str> {
    title.strip_prefix('`')?.strip_suffix('`')
}

#[test]
fn the_proto_parser_reads_what_the_compiler_reads() {
    let (parsed, _) = proto_api();
    let compiled = descriptor_api();
    assert_eq!(parsed.services, compiled.services, "services");
    assert_eq!(parsed.enums, compiled.enums, "enums");
    assert_eq!(parsed.messages, compiled.messages, "messages");
}

#[test]
fn every_declaration_in_the_proto_has_a_comment() {
    let (_, uncommented) = proto_api();
    assert!(
        uncommented.is_empty(),
        "these declarations have no comment above them (users see the comments in \
         `grpcurl describe` and docs/api.md follows them):\n{}",
        uncommented.join("\n")
    );
}

#[test]
fn api_md_documents_every_service_method_message_field_and_enum_value() {
    let (api, _) = proto_api();
    let path = repo().join("docs/api.md");
    let doc = sections(&read(&path));
    let mut problems = Vec::new();
    let mut by_title: BTreeMap<&str, &Section> = BTreeMap::new();
    for s in &doc {
        if let Some(name) = code(&s.title)
            && by_title.insert(name, s).is_some()
        {
            problems.push(format!(
                "line {}: heading {} appears twice",
                s.line, s.title
            ));
        }
    }
    let find = |name: &str, level: usize| by_title.get(name).filter(|s| s.level == level);

    for (service, rpcs) in &api.services {
        let title = format!("edge.v1.{service}");
        if find(&title, 2).is_none() {
            problems.push(format!("no section `## \\`{title}\\``"));
        }
        for (rpc, input, output) in rpcs {
            let title = format!("{service}/{rpc}");
            let Some(s) = find(&title, 3) else {
                problems.push(format!("no section `### \\`{title}\\``"));
                continue;
            };
            let text = s.body.join("\n");
            for ty in [input, output] {
                if !text.contains(&format!("`{ty}`")) {
                    problems.push(format!("line {}: {title} does not name `{ty}`", s.line));
                }
            }
            if !text.contains("Caller:") {
                problems.push(format!(
                    "line {}: {title} does not say who may call it (Caller:)",
                    s.line
                ));
            }
        }
    }
    for (message, fields) in &api.messages {
        let Some(s) = find(message, 3) else {
            problems.push(format!("no section `### \\`{message}\\`` (message)"));
            continue;
        };
        let documented = rows(s);
        if &documented != fields {
            problems.push(format!(
                "line {}: the table of message {message} must list exactly its fields, in proto order, \
                 as | `name` | `type` | meaning |\n  proto: {fields:?}\n  docs:  {documented:?}",
                s.line
            ));
        }
    }
    for (e, values) in &api.enums {
        let Some(s) = find(e, 3) else {
            problems.push(format!("no section `### \\`{e}\\`` (enum)"));
            continue;
        };
        let documented: Vec<(String, i32)> = rows(s)
            .into_iter()
            .map(|(v, n)| (v, n.parse().unwrap_or(-1)))
            .collect();
        if &documented != values {
            problems.push(format!(
                "line {}: the table of enum {e} must list exactly its values, in proto order, \
                 as | `VALUE` | number | meaning |\n  proto: {values:?}\n  docs:  {documented:?}",
                s.line
            ));
        }
    }
    // Nothing documented that the proto no longer has.
    for s in &doc {
        let Some(name) = code(&s.title) else { continue };
        let known = match (s.level, name.split_once('/')) {
            (2, _) => name
                .strip_prefix("edge.v1.")
                .is_none_or(|svc| api.services.contains_key(svc)),
            (3, Some((svc, rpc))) => api
                .services
                .get(svc)
                .is_some_and(|rpcs| rpcs.iter().any(|r| r.0 == rpc)),
            (3, None) => api.messages.contains_key(name) || api.enums.contains_key(name),
            _ => true,
        };
        if !known {
            problems.push(format!(
                "line {}: {} is not in the proto files",
                s.line, s.title
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} is out of date with proto/edge/v1:\n{}",
        path.display(),
        problems.join("\n")
    );
}

// ---- links in the project's Markdown ----

/// GitHub's anchor for a heading: lower case, spaces to `-`, other
/// punctuation dropped.
fn anchor(title: &str) -> String {
    title
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if path.is_dir() {
            if !(name.starts_with('.') || name == "target" || name.starts_with("edgepool-")) {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// `a/./b/../c` -> `a/c`; None if it climbs above its start.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// Link targets of a Markdown text outside code blocks: `[text](target)`
/// and code spans that are relative paths going up (`../x`).
fn link_targets(markdown: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in markdown.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let tail = &rest[at + 2..];
            let Some(end) = tail.find(')') else { break };
            out.push((i + 1, tail[..end].trim().to_string()));
            rest = &tail[end..];
        }
        for (k, span) in line.split('`').enumerate() {
            if k % 2 == 1 && span.starts_with("../") {
                out.push((i + 1, span.to_string()));
            }
        }
    }
    out
}

#[test]
fn markdown_links_stay_inside_the_repository() {
    let root = repo();
    let mut files = Vec::new();
    markdown_files(&root, &mut files);
    files.sort();
    assert!(
        files.iter().any(|f| f.ends_with("docs/api.md")),
        "{files:?}"
    );
    let mut problems = Vec::new();
    for file in &files {
        let text = read(file);
        let rel = file.strip_prefix(&root).expect("inside the repository");
        let dir = rel.parent().unwrap_or(Path::new(""));
        let anchors_of = |md: &str| -> BTreeSet<String> {
            sections(md).iter().map(|s| anchor(&s.title)).collect()
        };
        for (line, target) in link_targets(&text) {
            let at = format!("{}:{line}: {target}", rel.display());
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            if path.starts_with('/') {
                problems.push(format!(
                    "{at}: absolute path (link within the repository instead)"
                ));
                continue;
            }
            let resolved = if path.is_empty() {
                Some(rel.to_path_buf())
            } else {
                normalize(&dir.join(path))
            };
            let Some(resolved) = resolved else {
                problems.push(format!("{at}: points outside the repository"));
                continue;
            };
            let full = root.join(&resolved);
            if !full.exists() {
                problems.push(format!("{at}: no such file in the repository"));
                continue;
            }
            if let Some(fragment) = fragment
                && resolved.extension().is_some_and(|x| x == "md")
                && !anchors_of(&read(&full)).contains(fragment)
            {
                problems.push(format!("{at}: no heading #{fragment} there"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "Markdown links must point at files (and headings) inside the repository:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checks_catch_what_they_should() {
    let proto = "\
syntax = \"proto3\";
// A service.
service S {
  // A method.
  rpc M(stream A) returns (B);
  rpc N(A) returns (stream B);
}
// A.
message A {
  map<string, string> labels = 1;
  oneof msg {
    B b = 2;
  }
  optional uint32 slot = 3;
}
message B {}
// E.
enum E {
  X = 0;
  Y = 2;
}
";
    let mut api = Api::default();
    let mut uncommented = Vec::new();
    parse_proto("t.proto", proto, &mut api, &mut uncommented);
    assert_eq!(
        api.services["S"],
        [
            ("M".to_string(), "A".to_string(), "B".to_string()),
            ("N".to_string(), "A".to_string(), "B".to_string())
        ]
    );
    assert_eq!(
        api.messages["A"],
        [
            ("labels".to_string(), "map<string, string>".to_string()),
            ("b".to_string(), "B".to_string()),
            ("slot".to_string(), "optional uint32".to_string())
        ]
    );
    assert!(api.messages["B"].is_empty());
    assert_eq!(api.enums["E"], [("X".to_string(), 0), ("Y".to_string(), 2)]);
    assert_eq!(uncommented, ["t.proto:6: rpc N", "t.proto:16: message B"]);

    let md = "# T\n\n## `edge.v1.S`\n\n### `A`\n\n| Field | Type | Meaning |\n| --- | --- | --- |\n\
              | `labels` | `map<string, string>` | x |\n\n```sh\n# not a heading\n```\n### `E`\n";
    let s = sections(md);
    let titles: Vec<&str> = s.iter().map(|s| s.title.as_str()).collect();
    assert_eq!(titles, ["T", "`edge.v1.S`", "`A`", "`E`"]);
    assert_eq!(
        rows(&s[2]),
        [("labels".to_string(), "map<string, string>".to_string())]
    );
    assert_eq!(anchor("`edge.v1.TenantService`"), "edgev1tenantservice");
    assert_eq!(anchor("Who may call what"), "who-may-call-what");
    assert_eq!(
        normalize(Path::new("docs/../proto/x")),
        Some(PathBuf::from("proto/x"))
    );
    assert_eq!(normalize(Path::new("../shared/API.md")), None);
    let links =
        link_targets("see [api](docs/api.md#errors) and `../shared/API.md`\n```\n[x](../y)\n```\n");
    assert_eq!(
        links,
        [
            (1, "docs/api.md#errors".to_string()),
            (1, "../shared/API.md".to_string())
        ]
    );
}
