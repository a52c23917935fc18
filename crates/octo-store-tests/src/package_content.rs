//! The contract of package content (chunked, content-addressed): written
//! pending, visible only once complete, read back by chunk ranges, deleted
//! only when no package uses it, abandoned writes removed.

use octo_store::{PackageContent, Store, StoreError};

use crate::fixtures::new_package;

/// A SHA-256 made of one hex digit (the store trusts the writer's hash).
fn sha(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

/// Writes `chunks` as content `sha256` in chunks of `chunk_size` bytes.
async fn write(
    s: &dyn Store,
    node: &str,
    chunk_size: i64,
    chunks: &[&[u8]],
    sha256: &str,
) -> PackageContent {
    let id = s.begin_package_content(node, chunk_size, 1).await.unwrap();
    for (i, c) in chunks.iter().enumerate() {
        s.put_package_chunk(id, i as i64, c).await.unwrap();
    }
    let size = chunks.iter().map(|c| c.len() as i64).sum();
    s.finish_package_content(id, sha256, size).await.unwrap()
}

fn is_invalid<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) -> String {
    match r {
        Err(StoreError::Invalid(m)) => m,
        other => panic!("{what}: expected Invalid, got {other:?}"),
    }
}

pub async fn package_content_is_invisible_until_complete_and_reads_back_by_chunks(s: &dyn Store) {
    let a = sha('a');
    assert_eq!(s.package_content(&a).await.unwrap(), None);
    let id = s.begin_package_content("node-a", 4, 1).await.unwrap();
    s.put_package_chunk(id, 0, b"abcd").await.unwrap();
    // Written out of order: the index decides the place.
    s.put_package_chunk(id, 2, b"ij").await.unwrap();
    s.put_package_chunk(id, 1, b"efgh").await.unwrap();
    // Pending: no reader finds it, by hash or by id.
    assert_eq!(s.package_content(&a).await.unwrap(), None);
    assert!(s.package_chunks(id, 0, 10).await.unwrap().is_empty());
    let done = s
        .finish_package_content(id, &a.to_uppercase(), 10)
        .await
        .unwrap();
    assert_eq!(
        done,
        PackageContent {
            id,
            sha256: a.clone(),
            size: 10,
            chunk_size: 4
        }
    );
    assert_eq!(done.chunks(), 3);
    assert_eq!(
        s.package_content(&a.to_uppercase()).await.unwrap(),
        Some(done.clone())
    );
    let all = s.package_chunks(id, 0, 10).await.unwrap();
    assert_eq!(all.concat(), b"abcdefghij");
    assert_eq!(
        s.package_chunks(id, 1, 1).await.unwrap(),
        vec![b"efgh".to_vec()]
    );
    assert_eq!(
        s.package_chunks(id, 2, 5).await.unwrap(),
        vec![b"ij".to_vec()]
    );
    assert!(s.package_chunks(id, 3, 5).await.unwrap().is_empty());
    // Complete content takes no more chunks and cannot be completed again.
    is_invalid(
        s.put_package_chunk(id, 3, b"k").await,
        "a chunk after completion",
    );
    is_invalid(
        s.finish_package_content(id, &a, 10).await,
        "completing twice",
    );
    // Nor is it dropped as if it were a failed push.
    s.abandon_package_content(id).await.unwrap();
    assert_eq!(s.package_content(&a).await.unwrap(), Some(done.clone()));

    // The same content written again (another push, another node): the
    // first stays, the second's chunks are dropped.
    let again = write(s, "node-b", 4, &[b"abcd", b"efgh", b"ij"], &a).await;
    assert_eq!(again, done);
    assert_eq!(
        s.package_chunks(id, 0, 10).await.unwrap().concat(),
        b"abcdefghij"
    );

    // Empty content is content too (no chunk).
    let e = write(s, "node-a", 4, &[], &sha('e')).await;
    assert_eq!((e.size, e.chunks()), (0, 0));
    assert!(s.package_chunks(e.id, 0, 1).await.unwrap().is_empty());
}

pub async fn incomplete_or_malformed_package_content_is_refused(s: &dyn Store) {
    let b = sha('b');
    is_invalid(
        s.begin_package_content("node-a", 0, 1).await,
        "a chunk size of 0",
    );
    let id = s.begin_package_content("node-a", 4, 1).await.unwrap();
    is_invalid(s.put_package_chunk(id, 0, b"").await, "an empty chunk");
    is_invalid(
        s.put_package_chunk(id, 0, b"abcde").await,
        "a chunk too long",
    );
    is_invalid(
        s.put_package_chunk(id, -1, b"abcd").await,
        "a negative index",
    );
    s.put_package_chunk(id, 0, b"abcd").await.unwrap();
    let m = is_invalid(s.put_package_chunk(id, 0, b"abcd").await, "a chunk twice");
    assert!(m.contains("written already"), "{m}");
    s.put_package_chunk(id, 2, b"ij").await.unwrap();
    // Chunk 1 missing.
    let m = is_invalid(
        s.finish_package_content(id, &b, 10).await,
        "a missing chunk",
    );
    assert!(
        m.contains("incomplete") && m.contains("push the package again"),
        "{m}"
    );
    // A short chunk in the middle.
    s.put_package_chunk(id, 1, b"efg").await.unwrap();
    is_invalid(s.finish_package_content(id, &b, 9).await, "a short chunk");
    is_invalid(s.finish_package_content(id, &b, 10).await, "the wrong size");
    is_invalid(
        s.finish_package_content(id, "not-a-hash", 9).await,
        "a malformed SHA-256",
    );
    // Nothing was made visible by the refusals.
    assert_eq!(s.package_content(&b).await.unwrap(), None);
    // A failed push drops what it wrote; writing on is refused then.
    s.abandon_package_content(id).await.unwrap();
    s.abandon_package_content(id).await.unwrap();
    let m = is_invalid(s.put_package_chunk(id, 3, b"x").await, "a dropped upload");
    assert!(m.contains("not being written"), "{m}");
    is_invalid(
        s.finish_package_content(id, &b, 9).await,
        "completing a dropped upload",
    );
    is_invalid(
        s.finish_package_content(i64::MAX, &b, 0).await,
        "completing what never was",
    );
}

pub async fn package_content_is_deleted_only_when_no_package_uses_it(s: &dyn Store) {
    let a = sha('a');
    let content = write(s, "node-a", 4, &[b"abcd", b"ef"], &a).await;
    let p1 = new_package("Acme.Web", "1.0.0", 'a');
    let p2 = new_package("Acme.Api", "2.0.0", 'a');
    s.put_package(&p1, false, 1).await.unwrap();
    s.put_package(&p2, false, 2).await.unwrap();
    assert!(!s.delete_unused_package_content(&a).await.unwrap());
    s.delete_package(1, "Acme.Web", "1.0.0").await.unwrap();
    assert!(
        !s.delete_unused_package_content(&a).await.unwrap(),
        "still used by Acme.Api"
    );
    assert!(s.package_content(&a).await.unwrap().is_some());
    s.delete_package(1, "Acme.Api", "2.0.0").await.unwrap();
    assert!(s
        .delete_unused_package_content(&a.to_uppercase())
        .await
        .unwrap());
    assert_eq!(s.package_content(&a).await.unwrap(), None);
    assert!(s
        .package_chunks(content.id, 0, 10)
        .await
        .unwrap()
        .is_empty());
    // Nothing left to delete.
    assert!(!s.delete_unused_package_content(&a).await.unwrap());
    // A package row whose content is missing (an old feed not imported yet)
    // does not stop other content from being deleted.
    s.put_package(&new_package("Old", "1.0.0", 'c'), false, 3)
        .await
        .unwrap();
    write(s, "node-a", 4, &[b"zz"], &sha('d')).await;
    assert!(s.delete_unused_package_content(&sha('d')).await.unwrap());
    assert!(!s.delete_unused_package_content(&sha('c')).await.unwrap());
}

pub async fn abandoned_package_uploads_are_removed_by_node_or_age(s: &dyn Store) {
    let mine_old = s.begin_package_content("node-a", 4, 100).await.unwrap();
    let mine_new = s.begin_package_content("node-a", 4, 5_000).await.unwrap();
    let theirs_old = s.begin_package_content("node-b", 4, 100).await.unwrap();
    let theirs_new = s.begin_package_content("node-b", 4, 5_000).await.unwrap();
    for id in [mine_old, mine_new, theirs_old, theirs_new] {
        s.put_package_chunk(id, 0, b"abcd").await.unwrap();
    }
    let kept = write(s, "node-a", 4, &[b"abcd"], &sha('a')).await;
    // node-a starts: its own uploads go, and anyone's older than 1000.
    assert_eq!(
        s.remove_pending_package_contents("node-a", 1_000)
            .await
            .unwrap(),
        3
    );
    for id in [mine_old, mine_new, theirs_old] {
        is_invalid(
            s.put_package_chunk(id, 1, b"efgh").await,
            "a removed upload",
        );
    }
    // node-b's recent upload goes on and completes.
    s.put_package_chunk(theirs_new, 1, b"ef").await.unwrap();
    let done = s
        .finish_package_content(theirs_new, &sha('b'), 6)
        .await
        .unwrap();
    assert_eq!(
        s.package_chunks(done.id, 0, 2).await.unwrap().concat(),
        b"abcdef"
    );
    // Complete content is never removed as abandoned.
    assert_eq!(
        s.remove_pending_package_contents("node-b", i64::MAX)
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.package_content(&sha('a')).await.unwrap(), Some(kept));
    assert!(s.package_content(&sha('b')).await.unwrap().is_some());
}
