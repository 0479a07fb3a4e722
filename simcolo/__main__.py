from simcolo.cli import main

main()
