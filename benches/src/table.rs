//! `gavel-bench table RESULTS.jsonl [--json PATH]`: the rows that scenario
//! runs appended, side by side: design × scenario → throughput, p99, errors,
//! and the ratio to gavel on Postgres in the same scenario (the baselines all
//! keep their data in Postgres). `--json` writes the rows as one JSON list.

use serde_json::Value;

const SCENARIOS: [&str; 8] = [
    "hot_auction",
    "hot_auction_half_rate",
    "hot_auction_uncoordinated",
    "many_auctions",
    "many_auctions_half_rate",
    "reads",
    "http_ceiling",
    "ws_fanout",
];

pub fn print(results: &str, json: Option<&str>) {
    let text = std::fs::read_to_string(results).unwrap_or_else(|error| panic!("read {results}: {error}"));
    let rows: Vec<Value> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("a result row: {error}: {line}")))
        .collect();
    let reference = |scenario: &str| {
        rows.iter()
            .find(|row| row["design"] == "gavel" && row["backend"] == "postgres" && row["scenario"] == scenario)
            .and_then(|row| row["throughput_per_s"].as_f64())
    };
    println!(
        "{:<12} {:<11} {:<26} {:>13} {:>11} {:>9} {:>9} {:>7} {:>13}  correct",
        "design", "backend", "scenario", "throughput/s", "decided/s", "p50 ms", "p99 ms", "errors", "÷ gavel (pg)"
    );
    let order = |row: &Value| {
        let scenario = SCENARIOS.iter().position(|name| row["scenario"] == *name).unwrap_or(SCENARIOS.len());
        let design = ["gavel", "pg_row_lock", "redis_lock", "redis_lua"]
            .iter()
            .position(|name| row["design"] == *name)
            .unwrap_or(9);
        (scenario, design, row["backend"].as_str().unwrap_or("").to_owned())
    };
    let mut sorted: Vec<&Value> = rows.iter().collect();
    sorted.sort_by_key(|row| order(row));
    for row in sorted {
        let scenario = row["scenario"].as_str().unwrap_or("?");
        let throughput = row["throughput_per_s"].as_f64().unwrap_or(0.0);
        let ratio = match reference(scenario) {
            Some(gavel) if gavel > 0.0 => format!("{:.2}×", throughput / gavel),
            _ => "–".to_owned(),
        };
        let correct = match row.get("correct").and_then(Value::as_bool) {
            Some(true) => match row["not_durable_at_stop"].as_u64() {
                Some(pending) if pending > 0 => format!("yes ({pending} acked before durable)"),
                _ => "yes".to_owned(),
            },
            Some(false) => "NO".to_owned(),
            None => "–".to_owned(),
        };
        println!(
            "{:<12} {:<11} {:<26} {:>13} {:>11} {:>9.2} {:>9.2} {:>7} {:>13}  {correct}",
            row["design"].as_str().unwrap_or("?"),
            row["backend"].as_str().unwrap_or("?"),
            scenario,
            thousands(throughput),
            row["decided_per_s"].as_f64().map_or_else(|| "–".to_owned(), thousands),
            row["p50_ms"].as_f64().unwrap_or(0.0),
            row["p99_ms"].as_f64().unwrap_or(0.0),
            row["errors"].as_u64().unwrap_or(0),
            ratio,
        );
    }
    if let Some(path) = json {
        let list = serde_json::to_string_pretty(&rows).expect("json");
        std::fs::write(path, list + "\n").unwrap_or_else(|error| panic!("write {path}: {error}"));
    }
}

fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}
