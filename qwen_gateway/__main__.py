from qwen_gateway.cli import main

main()
