from l2m.mi.cli import run

run()
