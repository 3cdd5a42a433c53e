CREATE TABLE IF NOT EXISTS {schema}.{table}_{suffix} PARTITION OF {schema}.{table} FOR VALUES FROM ('{from}') TO ('{to}');
