//! One conformance list, run against every model: `cargo test blocking::` runs one model.

mod common;

macro_rules! conformance {
    (models: [$($model:ident),* $(,)?], cases: $cases:tt $(,)?) => {
        $(conformance!(@one $model, $cases);)*
    };
    (@one $model:ident, [$($case:ident),* $(,)?]) => {
        mod $model {
            $(
                #[test]
                fn $case() {
                    super::common::run_case(
                        &super::cli_name(stringify!($model)),
                        stringify!($case),
                        super::common::cases::$case,
                    );
                }
            )*
        }
    };
    // The same cases under a variant (transport, extra flags), in module `$variant`.
    (variant: $variant:ident = $make:expr, models: [$($model:ident),* $(,)?], cases: $cases:tt $(,)?) => {
        mod $variant {
            $(conformance!(@variant $variant, $model, $make, $cases);)*
        }
    };
    (@variant $variant:ident, $model:ident, $make:expr, [$($case:ident),* $(,)?]) => {
        mod $model {
            $(
                #[test]
                fn $case() {
                    super::super::common::run_case(
                        &super::super::cli_name(stringify!($model)),
                        concat!(stringify!($variant), "::", stringify!($case)),
                        |model| {
                            super::super::common::with_variant($make, || {
                                super::super::common::cases::$case(model)
                            })
                        },
                    );
                }
            )*
        }
    };
}

/// The `--model` value for a module name: `own_runtime` is `async` (a keyword in Rust).
fn cli_name(module: &str) -> String {
    match module {
        "own_runtime" => "async".to_string(),
        other => other.replace('_', "-"),
    }
}

/// Invokes `conformance!` with the given arguments and `cases: [...]`: every case that takes
/// its transport and `--max-buffer` from the variant, then any `extra` cases. One list, so a
/// new case runs under every variant unless it is deliberately listed as an extra.
macro_rules! with_cases {
    ({ $($args:tt)* } $(, extra: [$($extra:ident),* $(,)?])?) => {
        conformance! {
            $($args)*
            cases: [
                echo_byte_exact,
                every_stream_transport,
                datagram_each,
                datagram_no_reply_cases,
                half_close_drains,
                lines_wait_for_newline,
                short_writes_lose_nothing,
                unread_flood_bounded,
                panic_is_isolated,
                greeting_first,
                until_quit,
                many_clients,
                max_conns,
                idle_timeout,
                idle_server_sleeps,
                shutdown_drains,
                shutdown_closes_idle_at_once,
                drain_timeout_bounds_shutdown,
                out_of_descriptors_pauses,
                datagram_full_peer_does_not_stall,
                quit_lingers,
                panic_replies_first,
                idle_close_lingers,
                drain_lingers,
                lingering_holds_its_place,
                $($($extra,)*)?
            ],
        }
    };
}

// `prefix_flood_bounded` sets its own transport (TCP, whose kernel queues it reads) and
// `--max-buffer`, so it runs once per model, not again under each variant; so do the
// datagram size cases (datagram sockets only) and the case with every kind of socket.
with_cases!(
    {
        models: [blocking, threaded, pool, forking, busy_poll, select, poll, epoll, own_runtime, tokio, uring],
    },
    extra: [
        prefix_flood_bounded,
        datagram_big_unix,
        datagram_too_large_dropped,
        streams_and_datagrams_together,
        shutdown_drains_what_the_server_holds,
        drain_waits_without_spinning,
        drain_refuses_new_clients,
        idle_timeout_counts_during_the_drain,
        idle_while_replies_are_owed,
        slow_steady_reader_is_not_idle,
    ]
);

// uring's Unix paths (accept without a peer port, receives and sends on Unix sockets) and a
// large --max-buffer (receive budgets past one provided buffer, sends past the kernel's
// buffer) must behave as epoll's do: every case again, over a Unix stream socket, with the
// default and with --max-buffer 4M, and over TCP with --max-buffer 4M.
with_cases!({
    variant: unix_stream = crate::common::Variant { is_unix: true, extra_args: Vec::new() },
    models: [epoll, uring],
});

with_cases!({
    variant: unix_stream_4m = crate::common::Variant {
        is_unix: true,
        extra_args: vec!["--max-buffer".into(), "4M".into()],
    },
    models: [epoll, uring],
});

with_cases!({
    variant: tcp_4m = crate::common::Variant {
        is_unix: false,
        extra_args: vec!["--max-buffer".into(), "4M".into()],
    },
    models: [epoll, uring],
});

// `--threads` sizes only `pool`'s workers, so this case runs for `pool` alone.
mod pool_workers {
    #[test]
    fn lingering_peers_hold_no_worker() {
        super::common::run_case(
            "pool",
            "lingering_peers_hold_no_worker",
            super::common::cases::lingering_peers_hold_no_worker,
        );
    }
}
