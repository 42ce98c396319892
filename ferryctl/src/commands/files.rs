//! `ferryctl files ...`: list files (paginated), show one file with its
//! history, requeue failures, and follow the live `WatchEvents` stream.

use ferry_proto::{
    File, FileEvent, GetFileRequest, ListFilesRequest, RetryFilesRequest, WatchEventsRequest,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

use crate::commands::servers;
use crate::connect::Admin;
use crate::output::{self, Table, outln};
use crate::{FileOrder, FilesCmd, FilesListArgs, ServerRef};

/// Largest page the API serves.
const MAX_PAGE: u32 = 1000;

pub(crate) async fn run(admin: &Admin, cmd: FilesCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        FilesCmd::List(args) => list(admin, args, json).await,
        FilesCmd::Show { id } => show(admin, id, json).await,
        FilesCmd::Retry {
            ids,
            status,
            server,
            dry_run,
        } => {
            let statuses = status
                .iter()
                .map(|s| ferry_proto::convert::status_to_wire(*s))
                .collect();
            let request = RetryFilesRequest {
                ids,
                statuses,
                server_id: servers::resolve_filter(admin, server.as_ref()).await?,
                dry_run,
            };
            retry(admin, request, json).await
        }
        FilesCmd::Watch {
            server,
            watch_id,
            no_progress,
        } => {
            let args = WatchArgs {
                watch_id: watch_id.unwrap_or(0),
                json,
                progress: !no_progress,
            };
            follow(admin, server.as_ref(), args).await
        }
    }
}

async fn list(admin: &Admin, args: FilesListArgs, json: bool) -> anyhow::Result<()> {
    let server_id = servers::resolve_filter(admin, args.server.as_ref()).await?;
    let statuses: Vec<i32> = args
        .status
        .iter()
        .map(|s| ferry_proto::convert::status_to_wire(*s))
        .collect();
    let limit = usize::try_from(args.limit).unwrap_or(usize::MAX);
    let mut files: Vec<File> = Vec::new();
    let mut page_token = String::new();
    let mut more = false;
    loop {
        let page_size = if args.all {
            MAX_PAGE
        } else {
            let remaining = limit.saturating_sub(files.len());
            u32::try_from(remaining).unwrap_or(MAX_PAGE).min(MAX_PAGE)
        };
        let request = ListFilesRequest {
            statuses: statuses.clone(),
            server_id,
            watch_id: args.watch_id.unwrap_or(0),
            page_size,
            page_token: page_token.clone(),
            newest_first: args.sort == FileOrder::Newest,
        };
        let page = admin.call(admin.client().list_files(request)).await?;
        files.extend(page.files);
        if page.next_page_token.is_empty() {
            break;
        }
        if !args.all && files.len() >= limit {
            more = true;
            break;
        }
        if page.next_page_token == page_token {
            anyhow::bail!("the coordinator returned the same page token twice; stopping");
        }
        page_token = page.next_page_token;
    }
    if !args.all && files.len() > limit {
        files.truncate(limit);
        more = true;
    }
    if json {
        return Ok(output::print_json(&Value::Array(
            files.iter().map(file_json).collect(),
        ))?);
    }
    let mut table = Table::new(&[
        "ID", "SERVER", "WATCH", "PATH", "SIZE", "STATUS", "ATTEMPTS", "UPDATED", "ERROR",
    ]);
    for f in &files {
        table.row(vec![
            f.id.to_string(),
            f.server_name.clone(),
            f.watch_id.to_string(),
            f.path.clone(),
            output::size(f.size),
            output::status_name(f.status).to_string(),
            f.attempts.to_string(),
            output::age(f.updated_at.as_ref()),
            output::or_dash(&output::truncate(&f.last_error, 60)),
        ]);
    }
    table.print_or("no files match")?;
    if more {
        eprintln!("(more files match: raise --limit or pass --all)");
    }
    Ok(())
}

async fn show(admin: &Admin, id: i64, json: bool) -> anyhow::Result<()> {
    let response = admin
        .call(admin.client().get_file(GetFileRequest { id }))
        .await?;
    let Some(file) = response.file else {
        anyhow::bail!("the coordinator answered without file {id}");
    };
    if json {
        return Ok(output::print_json(&json!({
            "file": file_json(&file),
            "events": response.events.iter().map(event_json).collect::<Vec<_>>(),
            "earlier_events_omitted": response.earlier_events_omitted,
        }))?);
    }
    let lease = if file.lease_owner.is_empty() {
        "-".to_string()
    } else {
        format!(
            "{} until {}",
            file.lease_owner,
            output::time_and_age(file.lease_expires_at.as_ref())
        )
    };
    let object = if file.key.is_empty() {
        "-".to_string()
    } else {
        format!("s3://{}/{}", file.bucket, file.key)
    };
    let mtime = chrono::DateTime::from_timestamp(file.mtime_unix, 0)
        .map_or_else(|| file.mtime_unix.to_string(), output::rfc3339);
    output::print_fields(&[
        ("ID", file.id.to_string()),
        (
            "Server",
            format!("{} (id {})", file.server_name, file.server_id),
        ),
        ("Watch", file.watch_id.to_string()),
        ("Path", file.path.clone()),
        (
            "Size",
            format!("{} ({} bytes)", output::size(file.size), file.size),
        ),
        ("Modified", mtime),
        ("Status", output::status_name(file.status).to_string()),
        ("Attempts", file.attempts.to_string()),
        (
            "Next attempt",
            output::time_and_age(file.next_attempt_at.as_ref()),
        ),
        ("Last error", output::or_dash(&file.last_error)),
        ("Lease", lease),
        ("Fencing token", file.fencing_token.to_string()),
        ("Object", object),
        ("ETag", output::or_dash(&file.etag)),
        ("SHA-256", output::or_dash(&file.sha256)),
        ("Post-action", output::or_dash(&file.post_action_result)),
        ("Announcement", announcement(&file)),
        (
            "Discovered",
            output::time_and_age(file.discovered_at.as_ref()),
        ),
        ("Updated", output::time_and_age(file.updated_at.as_ref())),
    ])?;
    outln!("\nHistory:")?;
    if response.earlier_events_omitted > 0 {
        outln!(
            "({} earlier events not shown: the history is too long for one response)",
            response.earlier_events_omitted
        )?;
    }
    let mut table = Table::new(&["AT", "FROM", "TO", "ACTOR", "REASON"]);
    for e in &response.events {
        table.row(vec![
            output::time(e.at.as_ref()).map_or_else(|| "-".into(), output::rfc3339),
            display_status(e.from_status),
            display_status(e.to_status),
            output::or_dash(&e.actor),
            output::or_dash(&e.reason),
        ]);
    }
    Ok(table.print_or("(no history)")?)
}

async fn retry(admin: &Admin, request: RetryFilesRequest, json: bool) -> anyhow::Result<()> {
    let dry_run = request.dry_run;
    let response = admin.call(admin.client().retry_files(request)).await?;
    if json {
        output::print_json(&json!({
            "requeued": response.requeued,
            "file_ids": response.file_ids,
            "dry_run": dry_run,
        }))?;
    } else if dry_run {
        let files = output::count(response.requeued, "file", "files");
        outln!("would requeue {files} (dry run, nothing changed)")?;
        if let Some(line) = first_ids(&response.file_ids, response.requeued) {
            outln!("{line}")?;
        }
    } else {
        let files = output::count(response.requeued, "file", "files");
        outln!("requeued {files}")?;
    }
    Ok(())
}

/// File ids a dry run prints; `--json` has the first 1,000.
const IDS_SHOWN: usize = 20;

/// The first ids of a retry's selection of `count` rows; `None` when
/// there are none.
fn first_ids(ids: &[i64], count: u64) -> Option<String> {
    let first = &ids[..ids.len().min(IDS_SHOWN)];
    if first.is_empty() {
        return None;
    }
    let shown: Vec<String> = first.iter().map(i64::to_string).collect();
    Some(if first.len() as u64 >= count {
        format!("file ids: {}", shown.join(" "))
    } else {
        format!(
            "file ids: {} ... (the first {} of {count}; --json lists up to 1000)",
            shown.join(" "),
            first.len()
        )
    })
}

/// How often `files watch` shows the progress of running transfers.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// Waits between reconnects of a lost event stream: doubling up to the last.
const RECONNECT_DELAYS: [u64; 5] = [1, 2, 4, 8, 15];

/// Prints events as they arrive until Ctrl-C (exit 0), and every
/// [`PROGRESS_EVERY`] the bytes done of running transfers that moved. A lost
/// stream is reopened with the last event's resume token, so no event is
/// skipped or shown twice; a request the coordinator refuses (bad filter,
/// no permission) ends the command.
async fn follow(admin: &Admin, server: Option<&ServerRef>, args: WatchArgs) -> anyhow::Result<()> {
    let server_id = servers::resolve_filter(admin, server).await?;
    let mut view = FollowView {
        json: args.json,
        shown: HashMap::new(),
    };
    let mut resume_token = String::new();
    let mut failures = 0usize;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let request = WatchEventsRequest {
            server_id,
            watch_id: args.watch_id,
            resume_token: resume_token.clone(),
        };
        let lost = match admin.call(admin.client().watch_events(request)).await {
            Err(e) if !worth_reconnecting(&e) => return Err(e),
            Err(e) => e.to_string(),
            Ok(mut stream) => {
                if failures > 0 {
                    eprintln!(
                        "ferryctl: event stream reopened; continuing after the last event shown"
                    );
                    failures = 0;
                }
                let mut tick = tokio::time::interval(PROGRESS_EVERY);
                loop {
                    tokio::select! {
                        _ = &mut ctrl_c => return Ok(()),
                        _ = tick.tick(), if args.progress => {
                            // A failed look is skipped: the stream reports outages.
                            if let Ok(running) = running_files(admin, server_id, args.watch_id).await {
                                view.progress(&running)?;
                            }
                        }
                        message = stream.message() => match message {
                            Ok(Some(event)) => {
                                resume_token.clone_from(&event.resume_token);
                                view.event(&event)?;
                            }
                            Ok(None) => break "the coordinator closed the event stream".to_owned(),
                            Err(status) => break format!("{}: {}", status.code(), status.message()),
                        },
                    }
                }
            }
        };
        let delay = RECONNECT_DELAYS[failures.min(RECONNECT_DELAYS.len() - 1)];
        failures += 1;
        eprintln!("ferryctl: event stream lost ({lost}); reconnecting in {delay}s");
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(delay)) => {}
        }
    }
}

/// What `files watch` was asked for.
#[derive(Debug, Clone, Copy)]
struct WatchArgs {
    watch_id: i64,
    json: bool,
    progress: bool,
}

/// Whether a failed `WatchEvents` call may succeed if repeated (the
/// coordinator or the network is away), as opposed to a refused request.
fn worth_reconnecting(e: &anyhow::Error) -> bool {
    use tonic::Code;
    match e.downcast_ref::<tonic::Status>() {
        Some(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Unknown
                | Code::Internal
                | Code::Aborted
                | Code::Cancelled
                | Code::ResourceExhausted
        ),
        None => false,
    }
}

/// The running transfers under the filter (first 1000).
async fn running_files(admin: &Admin, server_id: i64, watch_id: i64) -> anyhow::Result<Vec<File>> {
    let request = ListFilesRequest {
        statuses: vec![ferry_proto::convert::status_to_wire(
            ferry_common::domain::FileStatus::InProgress,
        )],
        server_id,
        watch_id,
        page_size: MAX_PAGE,
        page_token: String::new(),
        newest_first: false,
    };
    Ok(admin.call(admin.client().list_files(request)).await?.files)
}

/// The output of `files watch`: events, and progress lines for running
/// transfers whose byte count moved since last shown.
struct FollowView {
    json: bool,
    /// Bytes last shown per running file (by id, with its fencing token).
    shown: HashMap<(i64, u64), u64>,
}

impl FollowView {
    fn event(&mut self, event: &FileEvent) -> anyhow::Result<()> {
        if self.json {
            outln!("{}", event_json(event))?;
        } else {
            outln!("{}", event_line(event))?;
        }
        Ok(())
    }

    fn progress(&mut self, running: &[File]) -> anyhow::Result<()> {
        let now = chrono::Utc::now();
        let mut still = HashMap::new();
        for f in running {
            let key = (f.id, f.fencing_token);
            let before = self.shown.get(&key).copied();
            still.insert(key, f.bytes_done);
            if f.bytes_done == 0 || before == Some(f.bytes_done) {
                continue;
            }
            if self.json {
                outln!("{}", progress_json(f))?;
            } else {
                outln!("{}", progress_line(f, now))?;
            }
        }
        // Finished transfers are forgotten; their events tell the rest.
        self.shown = still;
        Ok(())
    }
}

/// One human line for a running transfer's progress.
fn progress_line(f: &File, now: chrono::DateTime<chrono::Utc>) -> String {
    let pct = f
        .bytes_done
        .min(f.size)
        .saturating_mul(100)
        .checked_div(f.size)
        .unwrap_or(100);
    output::clean(&format!(
        "{}  file {} (server {}, watch {})  in_progress  {}  {} of {} ({pct}%)  by agent:{}",
        output::rfc3339(now),
        f.id,
        f.server_id,
        f.watch_id,
        f.path,
        output::size(f.bytes_done),
        output::size(f.size),
        f.lease_owner,
    ))
}

/// JSON shape of a progress line of `files watch --json` (`"type": "progress"`;
/// event objects have no `type`).
fn progress_json(f: &File) -> Value {
    json!({
        "type": "progress",
        "file_id": f.id,
        "server_id": f.server_id,
        "watch_id": f.watch_id,
        "path": f.path,
        "bytes_done": f.bytes_done,
        "size": f.size,
        "agent": f.lease_owner,
        "fencing_token": f.fencing_token,
    })
}

/// One human line per live event.
fn event_line(e: &FileEvent) -> String {
    let at = output::time(e.at.as_ref()).map_or_else(|| "-".into(), output::rfc3339);
    let mut line = format!(
        "{at}  file {}  {} -> {}  {}",
        event_ids(e),
        display_status(e.from_status),
        display_status(e.to_status),
        if e.path.is_empty() { "-" } else { &e.path },
    );
    if !e.actor.is_empty() {
        line.push_str("  by ");
        line.push_str(&e.actor);
    }
    if !e.reason.is_empty() {
        line.push_str(": ");
        line.push_str(&e.reason);
    }
    output::clean(&line)
}

/// `12 (server 3, watch 5)` when the stream filled the ids in, else `12`.
fn event_ids(e: &FileEvent) -> String {
    if e.server_id == 0 {
        return e.file_id.to_string();
    }
    format!(
        "{} (server {}, watch {})",
        e.file_id, e.server_id, e.watch_id
    )
}

/// Status for humans: `-` where there is none (a file's first event).
fn display_status(status: i32) -> String {
    match output::status_name(status) {
        "unspecified" => "-".into(),
        name => name.into(),
    }
}

/// JSON shape of a file.
pub(crate) fn file_json(f: &File) -> Value {
    let mtime = chrono::DateTime::from_timestamp(f.mtime_unix, 0)
        .map_or(Value::Null, |t| Value::String(output::rfc3339(t)));
    json!({
        "id": f.id,
        "server_id": f.server_id,
        "server_name": f.server_name,
        "watch_id": f.watch_id,
        "path": f.path,
        "size": f.size,
        "mtime": mtime,
        "status": output::status_name(f.status),
        "attempts": f.attempts,
        "next_attempt_at": output::json_time(f.next_attempt_at.as_ref()),
        "last_error": output::json_opt(&f.last_error),
        "lease_owner": output::json_opt(&f.lease_owner),
        "lease_expires_at": output::json_time(f.lease_expires_at.as_ref()),
        "fencing_token": f.fencing_token,
        "bucket": output::json_opt(&f.bucket),
        "key": output::json_opt(&f.key),
        "etag": output::json_opt(&f.etag),
        "sha256": output::json_opt(&f.sha256),
        "post_action_result": output::json_opt(&f.post_action_result),
        "announcement": output::json_opt(&f.announcement),
        "announcement_attempts": f.announcement_attempts,
        "announcement_error": output::json_opt(&f.announcement_error),
        "discovered_at": output::json_time(f.discovered_at.as_ref()),
        "updated_at": output::json_time(f.updated_at.as_ref()),
    })
}

/// JSON shape of a history event (also one line of `files watch --json`).
pub(crate) fn event_json(e: &FileEvent) -> Value {
    let status = |s: i32| match output::status_name(s) {
        "unspecified" => Value::Null,
        name => Value::String(name.into()),
    };
    json!({
        "id": e.id,
        "file_id": e.file_id,
        "at": output::json_time(e.at.as_ref()),
        "from_status": status(e.from_status),
        "to_status": status(e.to_status),
        "actor": e.actor,
        "reason": e.reason,
        "path": output::json_opt(&e.path),
        "server_id": e.server_id,
        "watch_id": e.watch_id,
    })
}

/// "published", "pending (refused 3 times: NO_ROUTE ...)", "parked (...)", or "-".
fn announcement(file: &File) -> String {
    match (file.announcement.as_str(), file.announcement_attempts) {
        ("", _) => "-".into(),
        (state, 0) => state.to_string(),
        ("parked", n) => format!(
            "parked after {n} refusals ({}); `ferryctl files retry {}` offers it again",
            file.announcement_error, file.id
        ),
        (state, n) => format!("{state} (refused {n} times: {})", file.announcement_error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dry_run_prints_the_first_ids_of_a_large_selection() {
        assert_eq!(first_ids(&[], 0), None);
        assert_eq!(first_ids(&[3, 5], 2).as_deref(), Some("file ids: 3 5"));
        let many: Vec<i64> = (1..=1000).collect();
        let line = first_ids(&many, 1500).unwrap();
        assert!(line.starts_with("file ids: 1 2 3 "), "{line}");
        assert!(line.contains(" 20 ... (the first 20 of 1500;"), "{line}");
        assert!(!line.contains(" 21 "), "{line}");
    }
    use ferry_proto::FileStatus as P;

    #[test]
    fn progress_lines_show_bytes_of_size_and_the_agent() {
        let file = File {
            id: 12,
            server_id: 3,
            watch_id: 5,
            path: "/in/big.bin".into(),
            size: 4 << 20,
            bytes_done: 1 << 20,
            lease_owner: "a1".into(),
            fencing_token: 7,
            ..Default::default()
        };
        let now = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        assert_eq!(
            progress_line(&file, now),
            "2023-11-14T22:13:20Z  file 12 (server 3, watch 5)  in_progress  /in/big.bin  1.0 MiB of 4.0 MiB (25%)  by agent:a1"
        );
        let json = progress_json(&file);
        assert_eq!(json["type"], "progress");
        assert_eq!(json["bytes_done"], 1 << 20);
        // Shown once per change of the byte count.
        let mut view = FollowView {
            json: true,
            shown: HashMap::new(),
        };
        view.progress(std::slice::from_ref(&file)).unwrap();
        assert_eq!(view.shown.get(&(12, 7)), Some(&(1 << 20)));
    }

    #[test]
    fn event_lines_and_json() {
        let event = FileEvent {
            id: 9,
            file_id: 12,
            at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            from_status: P::New as i32,
            to_status: P::InProgress as i32,
            actor: "agent:a1".into(),
            reason: "assigned".into(),
            path: "/in/a\nb.csv".into(),
            server_id: 3,
            watch_id: 5,
            resume_token: "token".into(),
        };
        assert_eq!(
            event_line(&event),
            "2023-11-14T22:13:20Z  file 12 (server 3, watch 5)  new -> in_progress  /in/a\\nb.csv  by agent:a1: assigned"
        );
        let v = event_json(&event);
        assert_eq!(v["to_status"], "in_progress");
        assert_eq!(v["at"], "2023-11-14T22:13:20Z");
        let first = FileEvent {
            to_status: P::New as i32,
            ..FileEvent::default()
        };
        assert_eq!(event_json(&first)["from_status"], Value::Null);
    }
}
