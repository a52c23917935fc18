//! A damaged database stops the server with one plain message: the file, what
//! SQLite says, and what to do, each said once (it used to repeat "opening the
//! database PATH" and name the file twice).
#![allow(clippy::unwrap_used)]

use octo_server_core::{start, RunArgs};

#[tokio::test]
async fn a_damaged_database_is_named_once_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let db = data.join("octopus.db");
    let junk = b"this is not an SQLite database, only text that fills a page ".repeat(100);
    std::fs::write(&db, &junk).unwrap();
    let Err(e) = start(&RunArgs::loopback(&data)).await else {
        panic!("a server started on a damaged database");
    };
    let msg = format!("{e:#}");
    let path = db.display().to_string();
    // Each part said once: the file, what SQLite says, what to do.
    assert_eq!(msg.matches(&path).count(), 1, "{msg}");
    assert_eq!(msg.matches("file is not a database").count(), 1, "{msg}");
    assert_eq!(msg.matches("restore it from a backup").count(), 1, "{msg}");
    assert!(!msg.contains("opening the database"), "{msg}");
    // Nothing was written to it.
    assert_eq!(std::fs::read(&db).unwrap(), junk);
}
