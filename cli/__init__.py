"""The dualblade command line (typer + rich): presentation only; the logic is in dualblade/."""
