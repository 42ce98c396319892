//! `ferryctl watches ...`: the directories the agents poll, with their glob,
//! schedule, destination and post-action.

use ferry_proto::{
    AddWatchRequest, ListWatchesRequest, RemoveWatchRequest, UpdateWatchRequest, Watch,
    convert::post_action_from_proto,
};
use serde_json::{Value, json};

use crate::commands::servers;
use crate::connect::{Admin, FULL_PAGE, all_pages};
use crate::output::{self, Table, outln};
use crate::{UsageError, WatchAddArgs, WatchUpdateArgs, WatchesCmd};

pub(crate) async fn run(admin: &Admin, cmd: WatchesCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        WatchesCmd::Add(args) => add(admin, args, json).await,
        WatchesCmd::Update(args) => update(admin, args, json).await,
        WatchesCmd::Remove { id } => remove(admin, id, json).await,
        WatchesCmd::List { server } => list(admin, server.as_ref(), json).await,
    }
}

async fn add(admin: &Admin, args: WatchAddArgs, json: bool) -> anyhow::Result<()> {
    let server_id = servers::resolve_id(admin, &args.server).await?;
    let request = AddWatchRequest {
        server_id,
        directory: args.dir,
        glob: args.glob.unwrap_or_default(),
        recursive: args.recursive,
        poll_interval_secs: args.interval.unwrap_or(0),
        min_age_secs: args.min_age,
        bucket: args.bucket,
        key_template: args.key_template.unwrap_or_default(),
        post_action: args.post_action.as_ref().map(Into::into),
        enabled: args.disabled.then_some(false),
        skip_existing: args.skip_existing,
    };
    let watch = admin.call(admin.client().add_watch(request)).await?;
    if json {
        return Ok(output::print_json(&watch_json(&watch))?);
    }
    outln!("added watch {}\n", watch.id)?;
    Ok(print_detail(&watch)?)
}

async fn update(admin: &Admin, args: WatchUpdateArgs, json: bool) -> anyhow::Result<()> {
    let flag = |on: bool, off: bool| match (on, off) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let request = UpdateWatchRequest {
        id: args.id,
        directory: args.dir,
        glob: args.glob,
        recursive: flag(args.recursive, args.no_recursive),
        poll_interval_secs: args.interval,
        min_age_secs: args.min_age,
        bucket: args.bucket,
        key_template: args.key_template,
        post_action: args.post_action.as_ref().map(Into::into),
        enabled: flag(args.enable, args.disable),
    };
    if request
        == (UpdateWatchRequest {
            id: args.id,
            ..UpdateWatchRequest::default()
        })
    {
        return Err(
            UsageError("nothing to change: give at least one option (see --help)".into()).into(),
        );
    }
    let watch = admin.call(admin.client().update_watch(request)).await?;
    if json {
        return Ok(output::print_json(&watch_json(&watch))?);
    }
    outln!("updated watch {}\n", watch.id)?;
    Ok(print_detail(&watch)?)
}

async fn remove(admin: &Admin, id: i64, json: bool) -> anyhow::Result<()> {
    admin
        .call(admin.client().remove_watch(RemoveWatchRequest { id }))
        .await?;
    if json {
        output::print_json(&json!({ "id": id }))?;
    } else {
        outln!("removed watch {id}")?;
    }
    Ok(())
}

async fn list(admin: &Admin, server: Option<&crate::ServerRef>, json: bool) -> anyhow::Result<()> {
    let server_id = servers::resolve_filter(admin, server).await?;
    let watches = all_watches(admin, server_id).await?;
    if json {
        return Ok(output::print_json(&Value::Array(
            watches.iter().map(watch_json).collect(),
        ))?);
    }
    Ok(table(&watches).print_or("no watches (add one with `ferryctl watches add`)")?)
}

/// The watch table, shared with `servers show`.
pub(crate) fn table(watches: &[Watch]) -> Table {
    let mut table = Table::new(&[
        "ID",
        "SERVER",
        "DIRECTORY",
        "GLOB",
        "RECURSIVE",
        "INTERVAL",
        "MIN-AGE",
        "BUCKET",
        "KEY-TEMPLATE",
        "POST-ACTION",
        "ENABLED",
    ]);
    for w in watches {
        table.row(vec![
            w.id.to_string(),
            w.server_name.clone(),
            w.directory.clone(),
            output::or_dash(&w.glob),
            output::yes_no(w.recursive),
            format!("{}s", w.poll_interval_secs),
            format!("{}s", w.min_age_secs),
            w.bucket.clone(),
            w.key_template.clone(),
            post_action_text(w),
            output::yes_no(w.enabled),
        ]);
    }
    table
}

fn print_detail(w: &Watch) -> std::io::Result<()> {
    output::print_fields(&[
        ("ID", w.id.to_string()),
        ("Server", format!("{} (id {})", w.server_name, w.server_id)),
        ("Directory", w.directory.clone()),
        ("Glob", output::or_dash(&w.glob)),
        ("Recursive", output::yes_no(w.recursive)),
        ("Poll interval", format!("{}s", w.poll_interval_secs)),
        ("Minimum age", format!("{}s", w.min_age_secs)),
        ("Bucket", w.bucket.clone()),
        ("Key template", w.key_template.clone()),
        ("Post-action", post_action_text(w)),
        ("Enabled", output::yes_no(w.enabled)),
        (
            "Baseline",
            if w.baseline_pending {
                "pending: files of the first listing will be recorded as skipped".into()
            } else {
                "-".into()
            },
        ),
        ("Created", output::time_and_age(w.created_at.as_ref())),
        ("Updated", output::time_and_age(w.updated_at.as_ref())),
    ])
}

/// Every watch of one server (or of all, for 0), following pages.
pub(crate) async fn all_watches(admin: &Admin, server_id: i64) -> anyhow::Result<Vec<Watch>> {
    all_pages(|page_token| async move {
        let page = admin
            .call(admin.client().list_watches(ListWatchesRequest {
                server_id,
                page_size: FULL_PAGE,
                page_token,
            }))
            .await?;
        Ok((page.watches, page.next_page_token))
    })
    .await
}

/// The post-action in the form `--post-action` takes (`keep`, `delete`,
/// `move:/dir`); `-` when the coordinator sent none, `invalid: ...` when it
/// sent one that does not check out.
fn post_action_text(w: &Watch) -> String {
    match w.post_action.as_ref().map(post_action_from_proto) {
        Some(Ok(action)) => action.to_string(),
        Some(Err(e)) => format!("invalid: {}", e.message),
        None => "-".into(),
    }
}

/// JSON shape of a watch.
pub(crate) fn watch_json(w: &Watch) -> Value {
    json!({
        "id": w.id,
        "server_id": w.server_id,
        "server_name": w.server_name,
        "directory": w.directory,
        "glob": w.glob,
        "recursive": w.recursive,
        "poll_interval_secs": w.poll_interval_secs,
        "min_age_secs": w.min_age_secs,
        "bucket": w.bucket,
        "key_template": w.key_template,
        "post_action": post_action_text(w),
        "enabled": w.enabled,
        "baseline_pending": w.baseline_pending,
        "created_at": output::json_time(w.created_at.as_ref()),
        "updated_at": output::json_time(w.updated_at.as_ref()),
    })
}
