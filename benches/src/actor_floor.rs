//! `gavel-actor-floor`: what one ractor actor costs before it holds anything.
//!
//! Spawns `--actors N` (100,000 by default) actors whose state is `()` and
//! whose message is one word, waits until each has handled a message, and
//! prints the heap bytes requested per actor (counted by this binary's
//! allocator, which is the node's: mimalloc) and the growth of the process's
//! resident memory per actor. `live_actors` reports a gavel node's memory per
//! live auction; this is the part of it that an actor of the same library
//! takes whatever it holds: its channels, its task and its cell.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

/// mimalloc, counting the bytes and blocks asked of it.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.dealloc(pointer, layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { mimalloc::MiMalloc.realloc(pointer, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

struct Empty;

impl Actor for Empty {
    type Msg = RpcReplyPort<()>;
    type State = ();
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ActorProcessingErr> {
        Ok(())
    }

    async fn handle(&self, _: ActorRef<Self::Msg>, reply: Self::Msg, _: &mut ()) -> Result<(), ActorProcessingErr> {
        let _ = reply.send(());
        Ok(())
    }
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .expect("VmRSS in /proc/self/status")
}

fn main() {
    let mut actors = 100_000usize;
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        match (argument.as_str(), arguments.next().and_then(|value| value.parse().ok())) {
            ("--actors", Some(count)) if count > 0 => actors = count,
            _ => {
                eprintln!("usage: gavel-actor-floor [--actors N]");
                std::process::exit(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let mut refs = Vec::with_capacity(actors);
        let (bytes_before, allocations_before, rss_before) =
            (LIVE_BYTES.load(Ordering::Relaxed), ALLOCATIONS.load(Ordering::Relaxed), resident_kib());
        for _ in 0..actors {
            let (actor, _) = Actor::spawn(None, Empty, ()).await.expect("spawn");
            refs.push(actor);
        }
        for actor in &refs {
            ractor::call_t!(actor, |reply| reply, 5_000).expect("an answer");
        }
        let held_by_refs = (refs.capacity() * std::mem::size_of::<ActorRef<RpcReplyPort<()>>>()) as isize;
        let bytes = LIVE_BYTES.load(Ordering::Relaxed) - bytes_before - held_by_refs;
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations_before;
        let rss = resident_kib().saturating_sub(rss_before) * 1024;
        println!(
            "actor_floor: {actors} empty ractor actors: {} heap bytes requested and {} allocations per actor; \
             resident memory {} bytes per actor",
            bytes / actors as isize,
            allocations / actors,
            rss.saturating_sub(held_by_refs as u64) / actors as u64,
        );
        for actor in refs {
            actor.stop(None);
        }
    });
}
