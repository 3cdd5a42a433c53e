COPY {schema}.{table} ({columns}) FROM STDIN (FORMAT binary)
