from fedlm.cli import main

main()
