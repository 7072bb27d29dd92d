"""Parses a node's /metrics (OpenMetrics text, read from stdin) with the Prometheus
project's own parser, and prints one JSON object: each sample as
`name{label="value",...}` (labels sorted) to its value, plus `"#families"`, the family
names with their types."""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families


def main():
    samples = {}
    families = {}
    for family in text_string_to_metric_families(sys.stdin.read()):
        families[family.name] = family.type
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    samples["#families"] = families
    print(json.dumps(samples))


if __name__ == "__main__":
    main()
