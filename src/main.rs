//! The `auto-com-center` binary: parse the command line, start logging, hand over to the library.

use std::process::ExitCode;

use auto_com_center::cli::{Cli, Command, ConfigError, RulesFormat, Settings};
use auto_com_center::telemetry::{self, OtelConfig};
use auto_com_center::{Application, app, auth};
use clap::Parser as _;
use tokio_util::sync::CancellationToken;

/// mimalloc: 10-15 % less CPU per request than glibc's allocator on the hot path
/// (docs/BENCHMARKS.md, run 6). Built with `no_thp`: with transparent huge pages its arenas held
/// 146-150 MiB under overload against glibc's 101-104 MiB; without, 112 MiB.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => match ConfigError::from_clap(&err) {
            // A refused value: one line naming the setting, like every other bad setting.
            Some(refusal) => {
                eprintln!("error: {refusal}");
                return ExitCode::from(2);
            }
            // Help, version, usage mistakes: as clap prints them.
            None => err.exit(),
        },
    };
    match cli.command {
        Command::Token(args) => {
            let minted = args
                .secret
                .require()
                .map_err(|e| e.to_string())
                .and_then(|secret| {
                    if args.ttl > args.max_token_lifetime {
                        return Err(format!(
                            "--ttl {} is longer than MAX_TOKEN_LIFETIME ({}); the service would refuse the token",
                            humantime::format_duration(args.ttl),
                            humantime::format_duration(args.max_token_lifetime)
                        ));
                    }
                    Ok(auth::mint(&secret, &args.agent_id, &args.scope, args.ttl))
                });
            match minted {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("error: {message}");
                    ExitCode::from(2)
                }
            }
        }
        Command::AlertRules(args) => {
            match auto_com_center::alerting::rules::load(args.alert_rules.as_deref()) {
                Ok(rules) => {
                    match args.format {
                        RulesFormat::Prometheus => {
                            print!(
                                "{}",
                                auto_com_center::alerting::rules::to_prometheus(
                                    &rules,
                                    args.metrics_agent_ids,
                                )
                            );
                        }
                        RulesFormat::Json => {
                            let file = auto_com_center::alerting::rules::RuleFile {
                                rules: rules.into_iter().map(|r| r.rule).collect(),
                            };
                            match serde_json::to_string_pretty(&file) {
                                Ok(text) => println!("{text}"),
                                Err(err) => {
                                    eprintln!("error: {err}");
                                    return ExitCode::FAILURE;
                                }
                            }
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(message) => {
                    eprintln!("error: invalid ALERT_RULES: {message}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Serve(args) => {
            let settings = match Settings::from_args(&args) {
                Ok(settings) => settings,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            let otel = match OtelConfig::from_env() {
                Ok(otel) => otel,
                Err(err) => {
                    eprintln!("error: {err}");
                    return ExitCode::from(2);
                }
            };
            let runtime = app::runtime(&settings).expect("tokio runtime");
            // Listening for SIGINT and SIGTERM before anything else runs: a signal that comes
            // during start-up stops the process cleanly instead of being lost (a listener made
            // later misses a signal that arrives while it is being made).
            let mut signals = {
                let _runtime = runtime.enter();
                match app::shutdown_signals() {
                    Ok(signals) => signals,
                    Err(err) => {
                        eprintln!("error: cannot listen for SIGINT and SIGTERM: {err}");
                        return ExitCode::FAILURE;
                    }
                }
            };
            // The gRPC exporter needs the runtime to exist when it is built.
            let telemetry = {
                let _runtime = runtime.enter();
                telemetry::init(settings.log_format, &settings.log_level, &otel)
            };
            let telemetry = match telemetry {
                Ok(telemetry) => telemetry,
                Err(err) => {
                    eprintln!("error: cannot set up trace export: {err:#}");
                    return ExitCode::from(2);
                }
            };
            let result = runtime.block_on(async {
                // The first signal stops start-up or drains; a second ends the drain at once.
                let (stop, hurry) = (CancellationToken::new(), CancellationToken::new());
                tokio::spawn({
                    let (stop, hurry) = (stop.clone(), hurry.clone());
                    async move {
                        signals.next().await;
                        stop.cancel();
                        signals.next().await;
                        hurry.cancel();
                    }
                });
                let Some(app) = Application::build_unless_stopped(settings, &stop).await? else {
                    tracing::info!("shutdown requested during start-up; stopped");
                    return Ok(());
                };
                app.run_until_stopped(stop.cancelled_owned(), hurry).await
            });
            if let Some(telemetry) = telemetry {
                telemetry.shutdown();
            }
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
