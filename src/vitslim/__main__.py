from vitslim.cli import main

main()
