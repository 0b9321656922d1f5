from l2m.mi.cli import main

main()
