//! `gavel-bench table RESULTS.jsonl [--json PATH]`: the rows that scenario
//! runs appended, side by side: design × scenario → throughput, p99, errors,
//! the ratio to gavel on Postgres in the same scenario (the baselines all
//! keep their data in Postgres), and where the rows measured it, the CPU time
//! a request cost the server and its store. `--json` writes the rows as one
//! JSON list.
//!
//! A run of several rounds (`scripts/bench --rounds N`: every design runs its
//! scenarios once per round) has rows that say their `round`. The table then
//! has one row per design and scenario: the round at the median throughput
//! (the lower middle one for an even count), with every round's throughput
//! beside it, the errors of all rounds added up, and `correct` only if every
//! round was. Ratios are of these medians, so a machine that slows down or
//! speeds up during the run moves them less than it moves a single pass.

use serde_json::{Value, json};

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
    let rows = medians(&rows);
    let reference = |scenario: &str| {
        rows.iter()
            .find(|row| row["design"] == "gavel" && row["backend"] == "postgres" && row["scenario"] == scenario)
            .map(throughput)
    };
    let several_rounds = rows.iter().any(|row| row["rounds"].as_u64().unwrap_or(1) > 1);
    println!(
        "{:<12} {:<11} {:<26} {:>13} {:>11} {:>9} {:>9} {:>7} {:>13} {:>13}  correct{}",
        "design",
        "backend",
        "scenario",
        "throughput/s",
        "decided/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "÷ gavel (pg)",
        "cpu µs/req",
        if several_rounds { "  throughput/s of each round" } else { "" }
    );
    for row in &rows {
        let scenario = row["scenario"].as_str().unwrap_or("?");
        let figure = throughput(row);
        let ratio = match reference(scenario) {
            Some(gavel) if gavel > 0.0 => format!("{:.2}×", figure / gavel),
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
        let each_round = match row["throughput_per_s_rounds"].as_array() {
            Some(rounds) if several_rounds => {
                let figures: Vec<String> =
                    rounds.iter().map(|figure| thousands(figure.as_f64().unwrap_or(0.0))).collect();
                format!("  {}", figures.join(" / "))
            }
            _ => String::new(),
        };
        println!(
            "{:<12} {:<11} {:<26} {:>13} {:>11} {:>9.2} {:>9.2} {:>7} {:>13} {:>13}  {correct}{each_round}",
            row["design"].as_str().unwrap_or("?"),
            row["backend"].as_str().unwrap_or("?"),
            scenario,
            thousands(figure),
            row["decided_per_s"].as_f64().map_or_else(|| "–".to_owned(), thousands),
            row["p50_ms"].as_f64().unwrap_or(0.0),
            row["p99_ms"].as_f64().unwrap_or(0.0),
            row["errors"].as_u64().unwrap_or(0),
            ratio,
            cpu_cell(row),
        );
    }
    if let Some(path) = json {
        let list = serde_json::to_string_pretty(&rows).expect("json");
        std::fs::write(path, list + "\n").unwrap_or_else(|error| panic!("write {path}: {error}"));
    }
}

/// One row per (design, backend, scenario), in the table's order: the row of
/// the round at the median throughput, with `rounds`,
/// `throughput_per_s_rounds` (each round's, in round order), `errors` added
/// up over the rounds and `correct` true only if every round said so. A
/// scenario run once keeps its row as it is, with `rounds` 1.
fn medians(rows: &[Value]) -> Vec<Value> {
    /// (design, backend, scenario)
    type RowKey = (String, String, String);
    let key = |row: &Value| -> RowKey {
        let text = |name: &str| row[name].as_str().unwrap_or("").to_owned();
        (text("design"), text("backend"), text("scenario"))
    };
    let mut groups: Vec<(RowKey, Vec<&Value>)> = Vec::new();
    for row in rows {
        let row_key = key(row);
        match groups.iter_mut().find(|(group, _)| *group == row_key) {
            Some((_, members)) => members.push(row),
            None => groups.push((row_key, vec![row])),
        }
    }
    let mut out: Vec<Value> = groups
        .into_iter()
        .map(|(_, mut members)| {
            members.sort_by_key(|row| row["round"].as_u64().unwrap_or(1));
            let each: Vec<f64> = members.iter().map(|row| throughput(row)).collect();
            let mut by_throughput = members.clone();
            by_throughput.sort_by(|a, b| throughput(a).total_cmp(&throughput(b)));
            let mut median = by_throughput[(by_throughput.len() - 1) / 2].clone();
            median["rounds"] = json!(members.len());
            median["throughput_per_s_rounds"] = json!(each);
            median["errors"] = json!(members.iter().map(|row| row["errors"].as_u64().unwrap_or(0)).sum::<u64>());
            let verdicts: Vec<bool> = members.iter().filter_map(|row| row["correct"].as_bool()).collect();
            if !verdicts.is_empty() {
                median["correct"] = json!(verdicts.len() == members.len() && verdicts.iter().all(|ok| *ok));
            }
            median
        })
        .collect();
    let order = |row: &Value| {
        let scenario = SCENARIOS.iter().position(|name| row["scenario"] == *name).unwrap_or(SCENARIOS.len());
        let design = ["gavel", "pg_row_lock", "redis_lock", "redis_lua"]
            .iter()
            .position(|name| row["design"] == *name)
            .unwrap_or(9);
        (scenario, design, row["backend"].as_str().unwrap_or("").to_owned())
    };
    out.sort_by_key(order);
    out
}

fn throughput(row: &Value) -> f64 {
    row["throughput_per_s"].as_f64().unwrap_or(0.0)
}

/// The CPU time a request cost, server + store, in µs (`server_cpu_us_per_request`
/// and `store_cpu_us_per_request`): "31+24", "18" with no store process, "–" unmeasured.
fn cpu_cell(row: &Value) -> String {
    let figure = |key: &str| row.get(key).and_then(Value::as_f64).map(|us| format!("{us:.0}"));
    match (figure("server_cpu_us_per_request"), figure("store_cpu_us_per_request")) {
        (Some(server), Some(store)) => format!("{server}+{store}"),
        (Some(server), None) => server,
        (None, Some(store)) => format!("–+{store}"),
        (None, None) => "–".to_owned(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(design: &str, scenario: &str, round: u64, throughput: f64, errors: u64, correct: bool) -> Value {
        json!({"design": design, "backend": "postgres", "scenario": scenario, "round": round,
               "throughput_per_s": throughput, "p50_ms": throughput / 1000.0, "p99_ms": 1.0,
               "errors": errors, "correct": correct})
    }

    #[test]
    fn several_rounds_make_one_row_each_at_the_median_round() {
        let rows = vec![
            row("redis_lua", "many_auctions", 1, 300.0, 0, true),
            row("gavel", "many_auctions", 1, 900.0, 0, true),
            row("redis_lua", "many_auctions", 2, 100.0, 2, true),
            row("gavel", "many_auctions", 2, 500.0, 0, true),
            row("redis_lua", "many_auctions", 3, 200.0, 0, false),
            row("gavel", "many_auctions", 3, 700.0, 1, true),
        ];
        let table = medians(&rows);
        assert_eq!(table.len(), 2, "{table:#?}");
        let gavel = &table[0];
        assert_eq!(gavel["design"], "gavel");
        assert_eq!(gavel["throughput_per_s"], 700.0);
        // The median round's own figures, not a mix of rounds.
        assert_eq!(gavel["p50_ms"], 0.7);
        assert_eq!(gavel["round"], 3);
        assert_eq!(gavel["rounds"], 3);
        assert_eq!(gavel["throughput_per_s_rounds"], json!([900.0, 500.0, 700.0]));
        assert_eq!(gavel["errors"], 1);
        assert_eq!(gavel["correct"], true);
        let lua = &table[1];
        assert_eq!(lua["throughput_per_s"], 200.0);
        assert_eq!(lua["errors"], 2);
        assert_eq!(lua["correct"], false, "one round was not correct");
    }

    #[test]
    fn the_cpu_cell_shows_the_server_and_the_store_where_measured() {
        let cell = |extra: Value| {
            let mut row = row("gavel", "hot_auction", 1, 5.0, 0, true);
            row.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            cpu_cell(&row)
        };
        assert_eq!(cell(json!({"server_cpu_us_per_request": 30.6, "store_cpu_us_per_request": 23.7})), "31+24");
        assert_eq!(cell(json!({"server_cpu_us_per_request": 18.2, "store_cpu_us_per_request": null})), "18");
        assert_eq!(cell(json!({})), "–");
    }

    #[test]
    fn an_even_count_takes_the_lower_middle_round_and_one_round_stays_as_it_was() {
        let rows = vec![
            row("gavel", "reads", 1, 40.0, 0, true),
            row("gavel", "reads", 2, 10.0, 0, true),
            row("gavel", "hot_auction", 1, 5.0, 0, true),
        ];
        let table = medians(&rows);
        assert_eq!(table.len(), 2);
        assert_eq!(table[0]["scenario"], "hot_auction");
        assert_eq!(table[0]["rounds"], 1);
        assert_eq!(table[0]["throughput_per_s"], 5.0);
        assert_eq!(table[1]["throughput_per_s"], 10.0);
        assert_eq!(table[1]["throughput_per_s_rounds"], json!([40.0, 10.0]));
    }
}
